"""BootMAE (Dong et al., 2022) with Masked Token Optimization (MTO) applied in both of its decoders.

Built on transformers' ViTMAE pieces, following the official code (LightDXY/BootMAE):

- the encoder is upstream's `ViTMAEModel` (visible patches only, CLS token, fixed 2-D sin-cos position embeddings in
  BootMAE's layout, which is MoCo v3's: height half first, unlike MAE's);
- a momentum encoder (`teacher`, an EMA copy of the encoder, frozen, saved with the checkpoint) runs on the whole,
  unmasked image; its last block's output (before the final LayerNorm) is the feature target;
- two decoders of blocks self-attention -> cross-attention to encoder features -> MLP: the pixel decoder (its own
  width, mask token and sin-cos table; cross-attends to the encoder's first block output) with a linear patch head,
  and the feature decoder (the encoder's width, its own mask token, the encoder's sin-cos table; cross-attends to the
  encoder's last block output) with a linear head. Only the mask tokens get a decoder position embedding;
- loss: MSE on per-patch per-channel normalised pixels plus the (ramped) feature weight times the MSE between the
  non-affine LayerNorm of the teacher's features and of the prediction, both on masked patches only, each masked patch
  weighted by the density of masked patches around it (`weight_mask`);
- the official initialisation (Xavier-uniform linear layers, q, k and v treated separately, zero biases, CLS token
  N(0, 1e-6), mask tokens truncated normal with std 0.02 cut at +-0.02).

The EMA update is `update_teacher(progress)`, which the method's `on_step_end` calls after every optimizer step;
the training progress it is given is kept in the `training_progress` buffer for the feature-weight ramp.
"""

import math
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.vit_mae.modeling_vit_mae import (
    ViTMAEAttention,
    ViTMAEEmbeddings,
    ViTMAEForPreTraining,
    ViTMAEMLP,
    ViTMAEModel,
    ViTMAEPreTrainedModel,
    build_2d_sinusoidal_position_embedding,
    eager_attention_forward,
)
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs
from transformers.utils.generic import can_return_tuple

from .configuration_bootmae_mto import BootMAEMTOConfig
from .mto import mto_terms_visible_first

PIXEL_NORM_EPS = 1e-5  # official: (x - mean) / sqrt(var + 1e-5), per patch and channel
FEATURE_NORM_EPS = 1e-6  # official: non-affine LayerNorm(eps=1e-6) on target and prediction


@dataclass
class BootMAEMTOTerms(ModelOutput):
    r"""
    The raw (unweighted) MTO terms of one decoder (one MTO stack), as `hf_mto.mto.MTOTerms` names them.

    sparsity_loss (`torch.FloatTensor` of shape `()`):
        L_spa (Eq. 3), mean over `config.mto_spa_layers`.
    singularity_loss (`torch.FloatTensor` of shape `()`):
        L_e = 1 / (H^0 + eps) (Eq. 6).
    ranking_loss (`torch.FloatTensor` of shape `()`):
        L_r (Eq. 7, direction per `config.mto_ranking`).
    heterogeneity (`torch.FloatTensor` of shape `(batch_size, num_decoder_layers + 1)`):
        Heterogeneity H^0..H^L of the decoder (Eq. 2) per image.
    """

    sparsity_loss: torch.FloatTensor | None = None
    singularity_loss: torch.FloatTensor | None = None
    ranking_loss: torch.FloatTensor | None = None
    heterogeneity: torch.FloatTensor | None = None


@dataclass
class BootMAEMTOForPreTrainingOutput(ModelOutput):
    r"""
    Output of [`BootMAEMTOForPreTraining`].

    loss (`torch.FloatTensor` of shape `()`):
        `pixel_loss + w * feature_loss`, `w` the feature weight at the current training progress. The MTO terms are
        *not* added: the trainer weights them.
    pixel_loss (`torch.FloatTensor` of shape `()`):
        MSE on the normalised pixels of the masked patches.
    feature_loss (`torch.FloatTensor` of shape `()`):
        MSE between the LayerNorm'd momentum-encoder features and the LayerNorm'd prediction, masked patches.
    feature_weight (`torch.FloatTensor` of shape `()`):
        The weight `w` of `feature_loss` in `loss`.
    logits (`torch.FloatTensor` of shape `(batch_size, num_patches, patch_size**2 * num_channels)`):
        Predicted (normalised) pixels of every patch, in the layout `unpatchify` takes.
    feature_prediction (`torch.FloatTensor` of shape `(batch_size, num_patches, hidden_size)`):
        Predicted momentum-encoder features of every patch.
    mask (`torch.FloatTensor` of shape `(batch_size, num_patches)`):
        1 = masked, 0 = visible.
    ids_restore (`torch.LongTensor` of shape `(batch_size, num_patches)`):
        Indices that put the encoder's (visible first) token order back in patch order.
    hidden_states, attentions:
        The encoder's, when requested.
    pixel_decoder_mto, feature_decoder_mto ([`BootMAEMTOTerms`]):
        Each decoder's MTO terms; `None` when MTO is off.
    """

    loss: torch.FloatTensor | None = None
    pixel_loss: torch.FloatTensor | None = None
    feature_loss: torch.FloatTensor | None = None
    feature_weight: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    feature_prediction: torch.FloatTensor | None = None
    mask: torch.FloatTensor | None = None
    ids_restore: torch.LongTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    pixel_decoder_mto: BootMAEMTOTerms | None = None
    feature_decoder_mto: BootMAEMTOTerms | None = None


def bootmae_sincos_position_embedding(num_patches: int, dim: int) -> torch.Tensor:
    """``[1, 1 + num_patches, dim]`` fixed 2-D sin-cos table with a zero CLS row, in BootMAE's (MoCo v3's) layout
    ``[sin(h w) | cos(h w) | sin(w w) | cos(w w)]``: transformers' table as it is, without the half swap that
    upstream ViTMAE applies for MAE's checkpoints."""
    grid = int(num_patches**0.5)
    table = build_2d_sinusoidal_position_embedding(height=grid, width=grid, embed_dim=dim, cls_token=True)
    return table.unsqueeze(0)


def momentum_decay(schedule, progress: float) -> float:
    """The EMA decay at training progress ``progress``: ``schedule``'s ``[progress, decay]`` points linearly
    interpolated, constant before the first and after the last."""
    if progress <= schedule[0][0]:
        return float(schedule[0][1])
    for (p0, d0), (p1, d1) in zip(schedule, schedule[1:], strict=False):
        if progress <= p1:
            return float(d0 + (progress - p0) / (p1 - p0) * (d1 - d0))
    return float(schedule[-1][1])


def _decoder_config(config: BootMAEMTOConfig, hidden_size: int, heads: int, intermediate_size: int, layers: int):
    """A copy of ``config`` sized for one decoder. Heads are ``hidden_size // heads`` wide (the official code's
    rounding: 512 wide with 12 heads attends in 12 x 42 = 504 dimensions)."""
    decoder_config = deepcopy(config)
    decoder_config.hidden_size = hidden_size
    decoder_config.num_attention_heads = heads
    decoder_config.intermediate_size = intermediate_size
    decoder_config.num_hidden_layers = layers
    decoder_config.head_dim = hidden_size // heads
    return decoder_config


class BootMAEMTOCrossAttention(nn.Module):
    """Multi-head attention of the decoder tokens (queries) to the encoder's tokens (keys and values, another width),
    through transformers' attention functions (eager, SDPA, ...). The official code fuses the key and value
    projections; they are separate here (with a key bias, which cannot change the softmax) and initialised as the
    fused one."""

    def __init__(self, config, memory_size: int):
        super().__init__()
        self.config = config
        self.num_attention_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.attention_dropout = config.attention_probs_dropout_prob
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        inner = self.num_attention_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, inner, bias=config.qkv_bias)
        self.k_proj = nn.Linear(memory_size, inner, bias=config.qkv_bias)
        self.v_proj = nn.Linear(memory_size, inner, bias=config.qkv_bias)
        self.o_proj = nn.Linear(inner, config.hidden_size, bias=True)
        # the official fused key-value layer is Xavier-initialised as one (2 * inner) x memory_size matrix
        self.k_proj._xavier_fan_out = self.v_proj._xavier_fan_out = 2 * inner

    def forward(
        self, hidden_states: torch.Tensor, memory: torch.Tensor, **kwargs: Unpack[TransformersKwargs]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch_size, num_queries, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(batch_size, num_queries, -1, self.head_dim).transpose(1, 2)
        key = self.k_proj(memory).view(batch_size, memory.shape[1], -1, self.head_dim).transpose(1, 2)
        value = self.v_proj(memory).view(batch_size, memory.shape[1], -1, self.head_dim).transpose(1, 2)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, weights = attention_interface(
            self,
            query,
            key,
            value,
            None,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        output = output.reshape(batch_size, num_queries, -1).contiguous()
        return self.o_proj(output), weights


class BootMAEMTODecoderLayer(GradientCheckpointingLayer):
    """BootMAE's decoder block, pre-norm: self-attention, cross-attention to the LayerNorm'd encoder tokens (a
    LayerNorm of the block's own), MLP; each with a residual connection."""

    def __init__(self, config, memory_size: int):
        super().__init__()
        self.attention = ViTMAEAttention(config)
        self.cross_attention = BootMAEMTOCrossAttention(config, memory_size)
        self.mlp = ViTMAEMLP(config)
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layernorm_cross = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layernorm_memory = nn.LayerNorm(memory_size, eps=config.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        attended, _ = self.attention(self.layernorm_before(hidden_states))
        hidden_states = hidden_states + self.dropout(attended)
        attended, _ = self.cross_attention(self.layernorm_cross(hidden_states), self.layernorm_memory(memory))
        hidden_states = hidden_states + self.dropout(attended)
        return hidden_states + self.dropout(self.mlp(self.layernorm_after(hidden_states)))


class BootMAEMTODecoder(nn.Module):
    """One of BootMAE's decoders: projects the encoder's output (CLS and visible tokens), appends its mask token
    (plus the position embedding of each masked patch) for every masked patch, runs its blocks (each cross-attending
    to an encoder ``memory``) and predicts every patch with a linear head.

    The blocks run on the tokens in the encoder's order -- CLS, the visible tokens, then the mask tokens -- and only
    the predictions are put back in patch order: the visible tokens carry the encoder's position embedding, each mask
    token its own, and neither attention depends on token order, so the predictions are those of the official
    patch-order decoder (up to float summation order), while the states H^0..H^L come out split into visible and
    masked tokens, as the MTO terms want them.

    Args:
        config: the decoder's config (`_decoder_config`).
        encoder_size: width of the encoder's tokens (input and memory).
        output_size: per-patch prediction size.
        num_patches: N.
        own_position_embeddings: whether the decoder has its own frozen sin-cos table (the pixel decoder) rather than
            being given the encoder's (the feature decoder).
    """

    def __init__(self, config, encoder_size: int, output_size: int, num_patches: int, own_position_embeddings: bool):
        super().__init__()
        self.config = config
        self.decoder_embed = nn.Linear(encoder_size, config.hidden_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embeddings = (
            nn.Parameter(torch.zeros(1, num_patches + 1, config.hidden_size), requires_grad=False)
            if own_position_embeddings
            else None
        )
        self.layers = nn.ModuleList(
            [BootMAEMTODecoderLayer(config, encoder_size) for _ in range(config.num_hidden_layers)]
        )
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.head = nn.Linear(config.hidden_size, output_size)
        self.gradient_checkpointing = False

    def forward(
        self,
        encoded: torch.Tensor,
        memory: torch.Tensor,
        ids_restore: torch.Tensor,
        position_embeddings: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """
        Args:
            encoded: ``[B, 1 + V, D_enc]`` the encoder's final-normed output (CLS, visible tokens).
            memory: ``[B, 1 + V, D_enc]`` the encoder tokens the blocks cross-attend to.
            ids_restore: ``[B, N]`` from the encoder.
            position_embeddings: ``[1, 1 + N, D]`` the table for the mask tokens when the decoder has none of its own.
        Returns:
            ``(prediction [B, N, output_size] in patch order, states)``; ``states`` (with ``output_hidden_states``)
            H^0..H^L, each ``[B, 1 + N, D]`` in the order CLS, visible, masked.
        """
        hidden_states = self.decoder_embed(encoded)
        batch_size, num_kept, dim = hidden_states.shape
        table = self.position_embeddings if self.position_embeddings is not None else position_embeddings
        ids_shuffle = torch.argsort(ids_restore, dim=1)
        masked_positions = table[0, 1:][ids_shuffle[:, num_kept - 1 :]]  # [B, M, D]: each masked patch's position
        hidden_states = torch.cat([hidden_states, self.mask_token + masked_positions], dim=1)
        states = [hidden_states] if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states, memory)
            if output_hidden_states:
                states.append(hidden_states)
        prediction = self.head(self.norm(hidden_states[:, 1:]))
        index = ids_restore.unsqueeze(-1).expand(-1, -1, prediction.shape[-1])
        return torch.gather(prediction, dim=1, index=index), (tuple(states) if states else None)


class BootMAEMTOPreTrainedModel(ViTMAEPreTrainedModel):
    config: BootMAEMTOConfig
    _no_split_modules = ["ViTMAEEmbeddings", "ViTMAELayer", "BootMAEMTODecoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module):
        """The official BootMAE initialisation (see the module docstring). Every write checks `_is_hf_initialized`,
        so weights loaded by `from_pretrained` are never overwritten."""
        super()._init_weights(module)
        if isinstance(module, nn.Linear):
            fan_out = getattr(module, "_xavier_fan_out", module.out_features)
            if getattr(module, "_torch_default_init", False):
                # the official pixel head is a ConvTranspose2d left at PyTorch's default: U(+-1/sqrt(P*P*C))
                bound = 1.0 / math.sqrt(module.out_features)
                init.uniform_(module.weight, -bound, bound)
                init.uniform_(module.bias, -bound, bound)
                return
            bound = math.sqrt(6.0 / (module.in_features + fan_out))
            init.uniform_(module.weight, -bound, bound)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, ViTMAEEmbeddings):
            self._init_embeddings(module)
        elif isinstance(module, BootMAEMTODecoder):
            if module.position_embeddings is not None:
                pos = module.position_embeddings
                init.copy_(pos, bootmae_sincos_position_embedding(pos.shape[1] - 1, pos.shape[2]))
            std = self.config.initializer_range
            init.trunc_normal_(module.mask_token, std=std, a=-std, b=std)  # the official cut at +-1 std
        elif isinstance(module, BootMAEMTOForPreTraining):
            init.zeros_(module.training_progress)
            # the momentum encoder starts as a copy of the encoder (built, or loaded without a teacher)
            student = dict(module.vit.named_parameters()) | dict(module.vit.named_buffers())
            for name, tensor in [*module.teacher.named_parameters(), *module.teacher.named_buffers()]:
                init.copy_(tensor, student[name])

    def _init_embeddings(self, module: ViTMAEEmbeddings) -> None:
        pos = module.position_embeddings
        if not getattr(pos, "_is_hf_initialized", False):
            pos.copy_(bootmae_sincos_position_embedding(pos.shape[1] - 1, pos.shape[2]))
        projection = module.patch_embeddings.projection
        if not getattr(projection.weight, "_is_hf_initialized", False):
            # as a linear layer, not a convolution
            torch.nn.init.xavier_uniform_(projection.weight.view(projection.weight.shape[0], -1))
        init.zeros_(projection.bias)
        init.normal_(module.cls_token, std=1e-6)


class BootMAEMTOModel(BootMAEMTOPreTrainedModel, ViTMAEModel):
    """Upstream's `ViTMAEModel` (the encoder), initialised as the official BootMAE when built from a config."""


class BootMAEMTOMomentumEncoder(BootMAEMTOModel):
    """The momentum encoder: an EMA copy of the encoder (`BootMAEMTOForPreTraining.update_teacher`), frozen. A class
    of its own so that nothing takes it for the base model."""


class BootMAEMTOForPreTraining(BootMAEMTOPreTrainedModel):
    r"""BootMAE pre-training model with the MTO terms (L_spa, L_e, L_r and the heterogeneity) computed on both
    decoders.

    Inputs as [`~transformers.ViTMAEForPreTraining`] (`pixel_values`, `noise`) plus `use_mto`. The returned `loss` is
    BootMAE's (pixels plus weighted features); each decoder's MTO terms come back separately, unweighted.
    """

    patchify = ViTMAEForPreTraining.patchify
    unpatchify = ViTMAEForPreTraining.unpatchify

    def __init__(self, config: BootMAEMTOConfig):
        super().__init__(config)
        self.config = config
        self.vit = BootMAEMTOModel(config)
        num_patches = self.vit.embeddings.patch_embeddings.num_patches
        pixel_config = _decoder_config(
            config,
            config.decoder_hidden_size,
            config.decoder_num_attention_heads,
            config.decoder_intermediate_size,
            config.decoder_num_hidden_layers,
        )
        feature_config = _decoder_config(
            config,
            config.hidden_size,
            config.num_attention_heads,
            config.intermediate_size,
            config.feature_decoder_num_hidden_layers,
        )
        patch_size = self.vit.embeddings.patch_embeddings.patch_size
        self.pixel_decoder = BootMAEMTODecoder(
            pixel_config, config.hidden_size, patch_size[0] * patch_size[1] * config.num_channels, num_patches, True
        )
        self.pixel_decoder.head._torch_default_init = True
        self.feature_decoder = BootMAEMTODecoder(
            feature_config, config.hidden_size, config.hidden_size, num_patches, False
        )
        # The momentum encoder: frozen, updated only by `update_teacher`; saved with the checkpoint.
        self.teacher = BootMAEMTOMomentumEncoder(config)
        self.teacher.requires_grad_(False)
        # progress t of the last `update_teacher` (the trainer's, after every optimizer step): the feature weight's ramp
        self.register_buffer("training_progress", torch.zeros((), dtype=torch.float32), persistent=True)
        self.post_init()

    @property
    def num_patches(self) -> int:
        return self.vit.embeddings.patch_embeddings.num_patches

    def set_attn_implementation(self, attn_implementation, *args, **kwargs):
        """Upstream's, then the same implementation for both decoders, whose configs are sized copies of the
        model's."""
        super().set_attn_implementation(attn_implementation, *args, **kwargs)
        for decoder in (self.pixel_decoder, self.feature_decoder):
            decoder.config._attn_implementation = self.config._attn_implementation

    def tie_weights(self, *args, **kwargs):
        """Upstream's, then the frozen tensors frozen again: transformers 5's `from_pretrained` loads every floating
        weight as a fresh trainable `nn.Parameter`, whatever the model declared, and calls this after loading. Frozen:
        the momentum encoder (updated only by `update_teacher`) and the fixed sin-cos tables."""
        super().tie_weights(*args, **kwargs)
        self.teacher.requires_grad_(False)
        self.vit.embeddings.position_embeddings.requires_grad_(False)
        self.pixel_decoder.position_embeddings.requires_grad_(False)

    def train(self, mode: bool = True):
        """The momentum encoder always runs in eval mode, as the official code sets it."""
        super().train(mode)
        self.teacher.eval()
        return self

    # ---------------------------------------------------------------------------------------------------------------
    # Momentum encoder and schedules
    # ---------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def update_teacher(self, progress: float) -> float:
        """One EMA step of the momentum encoder, ``teacher = decay * teacher + (1 - decay) * encoder`` for every
        parameter and floating buffer, with ``decay`` from `config.momentum_schedule` at training progress
        ``progress``; stores ``progress`` in `training_progress`. Returns the decay."""
        low_precision = sorted({str(t.dtype) for t in self.teacher.parameters() if t.dtype != torch.float32})
        if low_precision or self.training_progress.dtype != torch.float32:
            # (1 - 0.99999) x a weight's change is below bf16's resolution: the teacher would silently stop moving
            raise ValueError(
                f"the momentum encoder must stay float32 to take EMA steps, got {low_precision or 'a low-precision'} "
                "weights: train in float32 with mixed precision (--bf16 / --fp16 autocast), not a cast model"
            )
        decay = momentum_decay(self.config.momentum_schedule, progress)
        self.training_progress.fill_(progress)
        student = dict(self.vit.named_parameters()) | dict(self.vit.named_buffers())
        for name, tensor in [*self.teacher.named_parameters(), *self.teacher.named_buffers()]:
            if tensor.is_floating_point():
                # lerp: t + (1 - d) (s - t) = d t + (1 - d) s, and exactly t where s == t (the frozen tables)
                tensor.lerp_(student[name].detach().to(tensor.dtype), 1.0 - decay)
            else:
                tensor.copy_(student[name])
        return decay

    def current_feature_weight(self) -> torch.Tensor:
        """The feature loss's weight at `training_progress`: linear from 0 to `feature_weight` over the first
        `feature_weight_warmup` of training."""
        weight = self.config.feature_weight
        if self.config.feature_weight_warmup <= 0:
            return torch.full_like(self.training_progress, float(weight))
        return (self.training_progress / self.config.feature_weight_warmup).clamp(max=1.0) * weight

    @torch.no_grad()
    def teacher_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, N, D]`` the momentum encoder's last block output (before its final LayerNorm) on the whole image,
        patch tokens only: BootMAE's feature target."""
        embeddings = self.teacher.embeddings
        patches = embeddings.patch_embeddings(pixel_values)
        position = embeddings.position_embeddings
        cls_token = (embeddings.cls_token + position[:, :1]).expand(patches.shape[0], -1, -1)
        hidden_states = torch.cat([cls_token, patches + position[:, 1:]], dim=1)
        for layer in self.teacher.layers:
            hidden_states = layer(hidden_states)
        return hidden_states[:, 1:]

    # ---------------------------------------------------------------------------------------------------------------
    # Loss
    # ---------------------------------------------------------------------------------------------------------------

    def pixel_target(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, N, P*P*C]`` the regression target: with `norm_pix_loss` every patch normalised per channel by its
        own mean and biased variance (official BootMAE), else the raw pixels."""
        target = self.patchify(pixel_values)
        if not self.config.norm_pix_loss:
            return target
        per_channel = target.view(*target.shape[:2], -1, self.config.num_channels)  # [B, N, P*P, C]
        mean = per_channel.mean(dim=2, keepdim=True)
        var = per_channel.var(dim=2, unbiased=False, keepdim=True)
        return ((per_channel - mean) / (var + PIXEL_NORM_EPS) ** 0.5).view_as(target)

    def patch_weights(self, mask: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` loss weight per patch: 0 for visible patches; for masked ones 1, or with `weight_mask`
        ``1 + (masked patches in the 3x3 neighbourhood, itself included) / 9`` (official `--weight_mask`)."""
        if not self.config.weight_mask:
            return mask
        embeddings = self.vit.embeddings.patch_embeddings
        grid = [size // patch for size, patch in zip(embeddings.image_size, embeddings.patch_size, strict=True)]
        side = mask.view(mask.shape[0], 1, *grid)
        density = nn.functional.avg_pool2d(side, kernel_size=3, stride=1, padding=1, count_include_pad=True)
        return (side * density + side).flatten(1)

    def masked_mse(self, prediction, target, mask) -> torch.Tensor:
        """Per-patch MSE, weighted by `patch_weights`, summed and divided by the number of masked patches."""
        per_patch = ((prediction.float() - target.float()) ** 2).mean(dim=-1)
        return (per_patch * self.patch_weights(mask)).sum() / mask.sum()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        use_mto: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BootMAEMTOForPreTrainingOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Images.
        noise (`torch.FloatTensor` of shape `(batch_size, num_patches)`, *optional*):
            Per-patch noise; the encoder keeps the patches with the smallest noise (as MAE).
            `hf_mto.masking.mask_to_noise` turns any mask into noise that keeps exactly its visible patches.
        interpolate_pos_encoding (`bool`, *optional*):
            Not supported in pre-training (the decoders' tables are fixed to the configured image size).
        use_mto (`bool`, *optional*):
            Compute the MTO terms; defaults to `config.use_mto`. When `False` no MTO work is done.
        """
        if interpolate_pos_encoding:
            raise ValueError("BootMAE pre-training does not support interpolate_pos_encoding")
        use_mto = self.config.use_mto if use_mto is None else use_mto
        if noise is not None and tuple(noise.shape) != (pixel_values.shape[0], self.num_patches):
            expected = [pixel_values.shape[0], self.num_patches]
            raise ValueError(f"noise must have shape [batch, num_patches] = {expected}, got {list(noise.shape)}")
        return_hidden = kwargs.pop("output_hidden_states", None)
        return_hidden = self.config.output_hidden_states if return_hidden is None else return_hidden

        # official order: the momentum encoder's target from its weights before this step's update
        target_features = self.teacher_features(pixel_values)
        outputs = self.vit(
            pixel_values, noise=noise, attention_mask=attention_mask, output_hidden_states=True, **kwargs
        )
        first_block, last_block = outputs.hidden_states[1], outputs.hidden_states[-1]  # both before the final norm
        pixels, pixel_states = self.pixel_decoder(
            outputs.last_hidden_state, first_block, outputs.ids_restore, output_hidden_states=use_mto
        )
        features, feature_states = self.feature_decoder(
            outputs.last_hidden_state,
            last_block,
            outputs.ids_restore,
            position_embeddings=self.vit.embeddings.position_embeddings,
            output_hidden_states=use_mto,
        )

        hidden_states = outputs.hidden_states if return_hidden else None
        if isinstance(return_hidden, (list, tuple)):  # indices of the states asked for
            kept = {index % len(hidden_states) for index in return_hidden}
            hidden_states = tuple(state if i in kept else None for i, state in enumerate(hidden_states))

        mask = outputs.mask
        pixel_loss = self.masked_mse(pixels, self.pixel_target(pixel_values), mask)
        dim = features.shape[-1]
        feature_loss = self.masked_mse(
            nn.functional.layer_norm(features.float(), (dim,), eps=FEATURE_NORM_EPS),
            nn.functional.layer_norm(target_features.float(), (dim,), eps=FEATURE_NORM_EPS),
            mask,
        )
        feature_weight = self.current_feature_weight()
        loss = pixel_loss + feature_weight * feature_loss

        terms = {"pixel_decoder_mto": None, "feature_decoder_mto": None}
        if use_mto:
            num_visible = outputs.last_hidden_state.shape[1] - 1
            for name, states in (("pixel_decoder_mto", pixel_states), ("feature_decoder_mto", feature_states)):
                # The decoder states are CLS, the visible tokens, then the masked ones (see BootMAEMTODecoder).
                stack = mto_terms_visible_first(
                    states,
                    num_visible=num_visible,
                    num_prefix_tokens=1,  # the CLS token never counts
                    spa_layers=self.config.mto_spa_layers,
                    affinity=self.config.mto_affinity,
                    temperature=self.config.mto_temperature,
                    eps=self.config.mto_eps,
                    ranking=self.config.mto_ranking,
                )
                terms[name] = BootMAEMTOTerms(
                    sparsity_loss=stack.sparsity_loss,
                    singularity_loss=stack.singularity_loss,
                    ranking_loss=stack.ranking_loss,
                    heterogeneity=stack.heterogeneity,
                )
        return BootMAEMTOForPreTrainingOutput(
            loss=loss,
            pixel_loss=pixel_loss,
            feature_loss=feature_loss,
            feature_weight=feature_weight,
            logits=pixels,
            feature_prediction=features,
            mask=mask,
            ids_restore=outputs.ids_restore,
            hidden_states=hidden_states,
            attentions=outputs.attentions,
            **terms,
        )


__all__ = [
    "BootMAEMTOForPreTraining",
    "BootMAEMTOForPreTrainingOutput",
    "BootMAEMTOModel",
    "BootMAEMTOMomentumEncoder",
    "BootMAEMTOPreTrainedModel",
    "BootMAEMTOTerms",
]


def _register_checkpoint_conversion() -> None:
    """Give our classes upstream ViTMAE's key renaming, looked up by class name (transformers 5 applies a conversion
    mapping only to the class names and `model_type`s it knows): the encoder loads ViTMAE checkpoints in their
    legacy names, and `save_pretrained` writes upstream's names. Done here, in the modeling file, so that
    `trust_remote_code` loading gets it too."""
    for ours, upstream in (
        (BootMAEMTOForPreTraining.__name__, ViTMAEForPreTraining.__name__),
        (BootMAEMTOModel.__name__, ViTMAEModel.__name__),
    ):
        register_checkpoint_conversion_mapping(ours, get_checkpoint_conversion_mapping(upstream), overwrite=True)


_register_checkpoint_conversion()
