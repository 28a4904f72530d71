"""ViTMAE with Masked Token Optimization (MTO) applied in the decoder.

Subclasses transformers' ViTMAE: same module names and state-dict keys (upstream checkpoints load into it), plus

- a decoder that returns its states H^0..H^L (upstream's returns none), so the MTO terms are computed from the
  training forward itself, with whatever attention implementation is configured (SDPA stays SDPA);
- the official MAE initialisation when built from a config (upstream v5 leaves the position embeddings of encoder
  and decoder all zero and frozen, and the CLS and mask tokens zero; see DESIGN.md).
"""

from dataclasses import dataclass

import torch
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)
from transformers.models.vit_mae.modeling_vit_mae import (
    ViTMAEDecoder,
    ViTMAEDecoderOutput,
    ViTMAEEmbeddings,
    ViTMAEForPreTraining,
    ViTMAEForPreTrainingOutput,
    ViTMAEModel,
    ViTMAEPreTrainedModel,
    build_2d_sinusoidal_position_embedding,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple

from .configuration_vit_mae_mto import ViTMAEMTOConfig
from .mto import mto_terms_visible_first


@dataclass
class ViTMAEMTOForPreTrainingOutput(ViTMAEForPreTrainingOutput):
    r"""
    Output of [`ViTMAEMTOForPreTraining`]: upstream's fields plus the raw (unweighted) MTO terms, all `None` when MTO
    is off.

    loss (`torch.FloatTensor` of shape `()`):
        Pixel reconstruction loss (upstream's MAE loss). The MTO terms are *not* added: the trainer weights them.
    sparsity_loss (`torch.FloatTensor` of shape `()`):
        L_spa (Eq. 3), mean over `config.mto_spa_layers`.
    singularity_loss (`torch.FloatTensor` of shape `()`):
        L_e = 1 / (H^0 + eps) (Eq. 6).
    ranking_loss (`torch.FloatTensor` of shape `()`):
        L_r (Eq. 7, direction per `config.mto_ranking`).
    heterogeneity (`torch.FloatTensor` of shape `(batch_size, decoder_num_hidden_layers + 1)`):
        Heterogeneity H^0..H^L of the decoder (Eq. 2) per image. `hf_mto.mto.mean_heterogeneity` gives the batch
        mean the trainer logs.
    """

    sparsity_loss: torch.FloatTensor | None = None
    singularity_loss: torch.FloatTensor | None = None
    ranking_loss: torch.FloatTensor | None = None
    heterogeneity: torch.FloatTensor | None = None


def _mae_sincos_position_embedding(num_patches: int, dim: int) -> torch.Tensor:
    """``[1, 1 + num_patches, dim]`` fixed 2-D sin-cos table with a zero CLS row, in upstream's layout.

    Upstream (and the official MAE weights) put the width half before the height half; we keep that layout so our
    checkpoints and upstream's stay interchangeable.
    """
    grid = int(num_patches**0.5)
    table = build_2d_sinusoidal_position_embedding(height=grid, width=grid, embed_dim=dim, cls_token=True)
    half = dim // 2
    return torch.cat([table[..., half:], table[..., :half]], dim=-1).unsqueeze(0)


class ViTMAEMTOPreTrainedModel(ViTMAEPreTrainedModel):
    config: ViTMAEMTOConfig
    # upstream names its decoder class; ours has its own name (FSDP / device_map look these classes up by name)
    _no_split_modules = ["ViTMAEEmbeddings", "ViTMAELayer", "ViTMAEMTODecoder"]

    @torch.no_grad()
    def _init_weights(self, module):
        """Upstream's initialisation, then the official MAE one for the embeddings and the decoder.

        Every write goes through a check of `_is_hf_initialized`, so weights loaded by `from_pretrained` are never
        overwritten: only tensors that are really being initialised change.
        """
        super()._init_weights(module)
        if isinstance(module, ViTMAEEmbeddings):
            self._init_embeddings(module)
        elif isinstance(module, ViTMAEDecoder):
            self._init_decoder(module)

    def tie_weights(self, *args, **kwargs):
        """Upstream's, then the fixed sin-cos tables (encoder and decoder) frozen again: transformers 5's
        `from_pretrained` calls this after loading, which makes every floating weight a fresh trainable parameter
        whatever the model declared. Without it a loaded MAE (a resumed run, the official checkpoints) would train
        its position embeddings, which the official MAE keeps fixed."""
        super().tie_weights(*args, **kwargs)
        for module in self.modules():
            if isinstance(module, ViTMAEEmbeddings):
                module.position_embeddings.requires_grad_(False)
            elif isinstance(module, ViTMAEDecoder):
                module.decoder_pos_embed.requires_grad_(False)

    def _init_embeddings(self, module: ViTMAEEmbeddings) -> None:
        pos = module.position_embeddings
        if not getattr(pos, "_is_hf_initialized", False):
            pos.copy_(_mae_sincos_position_embedding(pos.shape[1] - 1, pos.shape[2]))
        weight = module.patch_embeddings.projection.weight
        if not getattr(weight, "_is_hf_initialized", False):
            # The official MAE initialises the patch projection like a linear layer, not a convolution.
            torch.nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        if not getattr(module.cls_token, "_is_hf_initialized", False):
            torch.nn.init.normal_(module.cls_token, std=self.config.initializer_range)

    def _init_decoder(self, module: ViTMAEDecoder) -> None:
        pos = module.decoder_pos_embed
        if not getattr(pos, "_is_hf_initialized", False):
            pos.copy_(_mae_sincos_position_embedding(pos.shape[1] - 1, pos.shape[2]))
        if not getattr(module.mask_token, "_is_hf_initialized", False):
            torch.nn.init.normal_(module.mask_token, std=self.config.initializer_range)


class ViTMAEMTOModel(ViTMAEMTOPreTrainedModel, ViTMAEModel):
    """Upstream's `ViTMAEModel` (the encoder), initialised as the official MAE when built from a config."""


class ViTMAEMTODecoder(ViTMAEDecoder):
    """Upstream's decoder that can also return its states H^0 (input of the first block: after `decoder_embed`,
    mask-token insertion and position embedding) and H^l (output of block l), each `[B, 1 + N, D]`, CLS first.

    With `output_hidden_states=True` the blocks run on the tokens in MAE's shuffled order -- CLS, the visible tokens,
    then the mask tokens -- and only the predictions are put back in patch order. Every token carries its own
    position embedding and attention does not depend on token order, so the predictions are upstream's (up to
    float summation order), while the states come out already split into visible and masked tokens: the MTO terms
    need no per-layer gather. Without it, the forward is upstream's, operation for operation.
    """

    def forward(
        self,
        hidden_states: torch.Tensor,
        ids_restore: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
    ) -> ViTMAEDecoderOutput:
        hidden_states = self.decoder_embed(hidden_states)  # [B, 1 + V, D]: CLS, then the visible tokens
        batch_size, num_kept, dim = hidden_states.shape
        mask_tokens = self.mask_token.repeat(batch_size, ids_restore.shape[1] + 1 - num_kept, 1)
        patch_tokens = torch.cat([hidden_states[:, 1:, :], mask_tokens], dim=1)  # [B, N, D], shuffled order
        if interpolate_pos_encoding:
            pos_embed = self.interpolate_pos_encoding(torch.cat([hidden_states[:, :1], patch_tokens], dim=1))
        else:
            pos_embed = self.decoder_pos_embed
        if output_hidden_states:
            ids_shuffle = torch.argsort(ids_restore, dim=1)
            patch_pos = pos_embed[0, 1:][ids_shuffle]  # [B, N, D]: each token's own position
            pos_embed = torch.cat([pos_embed[:, :1].expand(batch_size, -1, -1), patch_pos], dim=1)
        else:
            patch_tokens = torch.gather(patch_tokens, dim=1, index=ids_restore.unsqueeze(-1).expand(-1, -1, dim))
        hidden_states = torch.cat([hidden_states[:, :1, :], patch_tokens], dim=1) + pos_embed

        all_states = [hidden_states] if output_hidden_states else None
        for layer_module in self.decoder_layers:
            hidden_states = layer_module(hidden_states)
            if output_hidden_states:
                all_states.append(hidden_states)

        logits = self.decoder_pred(self.decoder_norm(hidden_states))[:, 1:, :]  # drop the CLS token
        if output_hidden_states:
            logits = torch.gather(logits, dim=1, index=ids_restore.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        return ViTMAEDecoderOutput(logits=logits, hidden_states=tuple(all_states) if all_states else None)


class ViTMAEMTOForPreTraining(ViTMAEMTOPreTrainedModel, ViTMAEForPreTraining):
    r"""MAE pre-training model with the MTO terms (L_spa, L_e, L_r and the heterogeneity) computed on the decoder.

    Same inputs as [`~transformers.ViTMAEForPreTraining`] (`pixel_values`, `noise`, ...) plus `use_mto`. The
    returned `loss` is the reconstruction loss alone; the MTO terms come back separately, unweighted.
    """

    def __init__(self, config: ViTMAEMTOConfig):
        # Not `ViTMAEForPreTraining.__init__`: it would build upstream's encoder and decoder only for us to replace
        # them. Same attribute names, so the state-dict keys are upstream's.
        ViTMAEPreTrainedModel.__init__(self, config)
        self.config = config
        self.vit = ViTMAEMTOModel(config)
        self.decoder = ViTMAEMTODecoder(config, num_patches=self.vit.embeddings.patch_embeddings.num_patches)
        self.post_init()

    @property
    def num_patches(self) -> int:
        return self.vit.embeddings.patch_embeddings.num_patches

    def _check_noise(self, pixel_values: torch.Tensor, noise: torch.Tensor | None) -> None:
        if noise is None:
            return
        expected = (pixel_values.shape[0], self.num_patches)
        if tuple(noise.shape) != expected:
            raise ValueError(f"noise must have shape [batch, num_patches] = {list(expected)}, got {list(noise.shape)}")

    def reconstruction_loss(
        self, pixel_values: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor, interpolate_pos_encoding=False
    ) -> torch.Tensor:
        """Upstream's MAE loss: per-patch MSE (on normalised pixels when `norm_pix_loss`), mean over masked patches.

        Args:
            pixel_values: ``[B, C, H, W]``.
            logits: ``[B, N, P*P*C]`` predicted patches.
            mask: ``[B, N]`` float, 1 = masked.
        """
        target = self.patchify(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((logits - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        use_mto: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ViTMAEMTOForPreTrainingOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Images.
        noise (`torch.FloatTensor` of shape `(batch_size, num_patches)`, *optional*):
            Per-patch noise; MAE keeps the patches with the smallest noise. `hf_mto.masking.mask_to_noise` turns any
            mask into noise that keeps exactly its visible patches.
        use_mto (`bool`, *optional*):
            Compute the MTO terms; defaults to `config.use_mto`. When `False` no MTO work is done.
        """
        use_mto = self.config.use_mto if use_mto is None else use_mto
        self._check_noise(pixel_values, noise)
        outputs = self.vit(
            pixel_values,
            noise=noise,
            interpolate_pos_encoding=interpolate_pos_encoding,
            attention_mask=attention_mask,
            **kwargs,
        )
        decoder_outputs = self.decoder(
            outputs.last_hidden_state,
            outputs.ids_restore,
            interpolate_pos_encoding=bool(interpolate_pos_encoding),
            output_hidden_states=use_mto,
        )
        loss = self.reconstruction_loss(
            pixel_values, decoder_outputs.logits, outputs.mask, interpolate_pos_encoding=bool(interpolate_pos_encoding)
        )
        terms = None
        if use_mto:
            # The decoder states are CLS, the visible tokens, then the masked ones (see ViTMAEMTODecoder).
            terms = mto_terms_visible_first(
                decoder_outputs.hidden_states,
                num_visible=outputs.last_hidden_state.shape[1] - 1,
                num_prefix_tokens=1,  # the CLS token never counts
                spa_layers=self.config.mto_spa_layers,
                affinity=self.config.mto_affinity,
                temperature=self.config.mto_temperature,
                eps=self.config.mto_eps,
                ranking=self.config.mto_ranking,
            )
        return ViTMAEMTOForPreTrainingOutput(
            loss=loss,
            logits=decoder_outputs.logits,
            mask=outputs.mask,
            ids_restore=outputs.ids_restore,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            sparsity_loss=terms.sparsity_loss if terms else None,
            singularity_loss=terms.singularity_loss if terms else None,
            ranking_loss=terms.ranking_loss if terms else None,
            heterogeneity=terms.heterogeneity if terms else None,
        )


__all__ = ["ViTMAEMTOForPreTraining", "ViTMAEMTOModel", "ViTMAEMTOPreTrainedModel", "ViTMAEMTOForPreTrainingOutput"]


def _register_checkpoint_conversion() -> None:
    """Give our classes upstream's key renaming, looked up by class name (transformers 5 applies a conversion mapping
    only to the class names and `model_type`s it knows, and none to custom code that did not register one).

    Loading then maps the legacy names of the Hub's official MAE checkpoints and of upstream's `save_pretrained`
    (``encoder.layer.N.attention.attention.query``) to the modules' names, and `save_pretrained` writes upstream's
    names, so other tools read our checkpoints. Done here, in the modeling file, so that `trust_remote_code`
    loading gets it too.
    """
    for ours, upstream in (
        (ViTMAEMTOForPreTraining.__name__, ViTMAEForPreTraining.__name__),
        (ViTMAEMTOModel.__name__, ViTMAEModel.__name__),
    ):
        register_checkpoint_conversion_mapping(ours, get_checkpoint_conversion_mapping(upstream), overwrite=True)


_register_checkpoint_conversion()
