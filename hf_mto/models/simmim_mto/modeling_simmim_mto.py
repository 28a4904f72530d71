"""SimMIM (transformers' `ViTForMaskedImageModeling`) with Masked Token Optimization applied in the encoder.

Subclasses upstream: same modules and state-dict keys, same reconstruction (1x1 conv + pixel shuffle) and L1 loss on
the masked pixels. The encoder states come from upstream's own `output_hidden_states`, so the configured attention
implementation is kept. One deliberate difference: the mask token is initialised N(0, 0.02) truncated, as in the
official SimMIM, where upstream initialises it to zeros.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import ViTForMaskedImageModeling, ViTModel
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutputWithPooling, MaskedImageModelingOutput
from transformers.models.vit.modeling_vit import ViTEmbeddings, ViTPreTrainedModel
from transformers.utils.generic import can_return_tuple

from .configuration_simmim_mto import SimMIMMTOConfig
from .mto import mto_terms, mto_terms_visible_first


@dataclass
class SimMIMMTOOutput(MaskedImageModelingOutput):
    r"""
    Output of [`SimMIMMTOForMaskedImageModeling`]: upstream's fields plus the mask and the raw (unweighted) MTO terms,
    which are `None` when MTO is off or no mask was given.

    loss (`torch.FloatTensor` of shape `()`):
        Upstream's L1 loss on the masked pixels. The MTO terms are *not* added: the trainer weights them.
    mask (`torch.BoolTensor` of shape `(batch_size, num_patches)`):
        The `bool_masked_pos` the forward used, True = masked.
    sparsity_loss, singularity_loss, ranking_loss (`torch.FloatTensor` of shape `()`):
        L_spa (Eq. 3, mean over `config.mto_spa_layers`), L_e (Eq. 6), L_r (Eq. 7).
    heterogeneity (`torch.FloatTensor` of shape `(num_hidden_layers + 1,)`):
        Batch-mean heterogeneity H^0..H^L of the encoder (Eq. 2).
    """

    mask: torch.BoolTensor | None = None
    sparsity_loss: torch.FloatTensor | None = None
    singularity_loss: torch.FloatTensor | None = None
    ranking_loss: torch.FloatTensor | None = None
    heterogeneity: torch.FloatTensor | None = None


class SimMIMMTOPreTrainedModel(ViTPreTrainedModel):
    config: SimMIMMTOConfig

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ViTEmbeddings) and module.mask_token is not None:
            if not getattr(module.mask_token, "_is_hf_initialized", False):  # never overwrite loaded weights
                nn.init.trunc_normal_(module.mask_token, std=self.config.initializer_range)


class _PermuteTokens(torch.autograd.Function):
    """``hidden[b, index[b]]`` for a per-image token permutation, whose backward is the inverse permutation.

    Rows are picked from ``hidden`` viewed as ``[B * T, D]`` by one `index_select` on flat row indices: on CPU about
    ten times faster than `gather` with the index expanded over D, and a gradient of one `index_select` instead of
    a zero fill plus `scatter_add`.

    Args (forward):
        hidden: ``[B, T, D]``.
        index: ``[B * T]`` flat rows, ``b * T + order[b, t]``.
        inverse: ``[B * T]`` the inverse permutation of ``index``.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index, inverse)
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, index).view(hidden.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        index, inverse = ctx.saved_tensors
        return _PermuteTokens.apply(grad, inverse, index), None, None


def visible_first_order(bool_masked_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat row indices that put each image's tokens (CLS, then the patches) as CLS, visible patches, masked patches.

    Args:
        bool_masked_pos: ``[B, N]`` bool, True = masked.

    Returns:
        ``index`` and its ``inverse``, both ``[B * (N + 1)]``, for `_PermuteTokens` on ``[B, N + 1, D]`` states.
    """
    batch_size, num_patches = bool_masked_pos.shape
    order = torch.argsort(bool_masked_pos.to(torch.uint8), dim=1, stable=True) + 1  # visible first
    order = torch.cat([order.new_zeros(batch_size, 1), order], dim=1)  # CLS stays first, [B, N + 1]
    index = (order + torch.arange(batch_size, device=order.device)[:, None] * (num_patches + 1)).flatten()
    inverse = torch.empty_like(index)
    inverse[index] = torch.arange(index.numel(), device=index.device)
    return index, inverse


class SimMIMMTOModel(SimMIMMTOPreTrainedModel, ViTModel):
    """Upstream's `ViTModel` (the encoder), with the official SimMIM mask-token initialisation.

    With `visible_first=True` (MTO on, same masked count in every image) the blocks run on the tokens reordered as
    CLS, visible patches, masked patches, and only the final sequence is put back in patch order. Every token
    carries its own position embedding and attention does not depend on token order, so the output is upstream's
    (up to float summation order), while the returned states come out already split into visible and masked
    tokens: the MTO terms need no per-layer token selection. Otherwise the forward is upstream's.
    """

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.BoolTensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        visible_first: bool = False,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        if not visible_first:
            return super().forward(
                pixel_values,
                bool_masked_pos=bool_masked_pos,
                interpolate_pos_encoding=interpolate_pos_encoding,
                attention_mask=attention_mask,
                **kwargs,
            )
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)
        embeddings = self.embeddings(
            pixel_values, bool_masked_pos=bool_masked_pos, interpolate_pos_encoding=bool(interpolate_pos_encoding)
        )
        index, inverse = visible_first_order(bool_masked_pos)
        hidden_states = _PermuteTokens.apply(embeddings, index, inverse)
        mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask
        )
        states = [hidden_states]
        for layer in self.layers:
            hidden_states = layer(hidden_states, mask)
            states.append(hidden_states)
        sequence_output = _PermuteTokens.apply(self.layernorm(hidden_states), inverse, index)
        return BaseModelOutputWithPooling(last_hidden_state=sequence_output, hidden_states=tuple(states))


class SimMIMMTOForMaskedImageModeling(SimMIMMTOPreTrainedModel, ViTForMaskedImageModeling):
    r"""SimMIM pre-training model with the MTO terms computed on the encoder.

    Same inputs as [`~transformers.ViTForMaskedImageModeling`] (`pixel_values`, `bool_masked_pos`) plus `use_mto`.
    `loss` is upstream's reconstruction loss alone; the MTO terms come back separately, unweighted.
    """

    def __init__(self, config: SimMIMMTOConfig):
        # Not `ViTForMaskedImageModeling.__init__`: it would build and initialise upstream's encoder only for us to
        # replace it. Same attribute names and head, so the state-dict keys are upstream's.
        ViTPreTrainedModel.__init__(self, config)
        self.vit = SimMIMMTOModel(config, add_pooling_layer=False, use_mask_token=True)
        self.decoder = nn.Sequential(
            nn.Conv2d(config.hidden_size, config.encoder_stride**2 * config.num_channels, kernel_size=1),
            nn.PixelShuffle(config.encoder_stride),
        )
        self.post_init()

    @property
    def num_patches(self) -> int:
        return self.vit.embeddings.patch_embeddings.num_patches

    def _check_mask(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        expected = [pixel_values.shape[0], self.num_patches]
        if list(bool_masked_pos.shape) != expected:
            raise ValueError(
                f"bool_masked_pos must have shape [batch, num_patches] = {expected}, got {list(bool_masked_pos.shape)}"
            )
        if bool_masked_pos.dtype != torch.bool:
            if bool_masked_pos.is_floating_point() or bool_masked_pos.is_complex():
                raise ValueError(f"bool_masked_pos must be bool (True = masked), got dtype {bool_masked_pos.dtype}")
            bool_masked_pos = bool_masked_pos.bool()
        return bool_masked_pos

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.BoolTensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        use_mto: bool | None = None,
        **kwargs,
    ) -> SimMIMMTOOutput:
        r"""
        bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, num_patches)`):
            True = masked. The generators of `hf_mto.masking` make SimMIM's block masks and the others.
        use_mto (`bool`, *optional*):
            Compute the MTO terms; defaults to `config.use_mto`. They need `bool_masked_pos`; without a mask (e.g.
            feature extraction) none are computed.
        """
        use_mto = (self.config.use_mto if use_mto is None else use_mto) and bool_masked_pos is not None
        num_masked = None
        if bool_masked_pos is not None:
            bool_masked_pos = self._check_mask(pixel_values, bool_masked_pos)
        if use_mto:
            counts = bool_masked_pos.sum(dim=1)
            # Every mask generator of hf_mto masks the same count in each image: then the encoder runs on
            # visible-first order (see SimMIMMTOModel). This is read before any heavy kernel is queued, so the host
            # waits for nothing but the mask itself.
            first = int(counts[0])
            if bool((counts == first).all()) and 0 < first < bool_masked_pos.shape[1]:
                num_masked = first
                kwargs["visible_first"] = True
            else:
                kwargs["output_hidden_states"] = True
        outputs = super().forward(
            pixel_values,
            bool_masked_pos=bool_masked_pos,
            interpolate_pos_encoding=interpolate_pos_encoding,
            attention_mask=attention_mask,
            **kwargs,
        )
        terms = None
        if use_mto:
            settings = dict(
                spa_layers=self.config.mto_spa_layers,
                affinity=self.config.mto_affinity,
                temperature=self.config.mto_temperature,
                eps=self.config.mto_eps,
                ranking=self.config.mto_ranking,
            )
            if num_masked is not None:
                num_visible = bool_masked_pos.shape[1] - num_masked
                # the CLS token never counts
                terms = mto_terms_visible_first(outputs.hidden_states, num_visible, num_prefix_tokens=1, **settings)
            else:
                terms = mto_terms([state[:, 1:] for state in outputs.hidden_states], bool_masked_pos, **settings)
        return SimMIMMTOOutput(
            loss=outputs.loss,
            reconstruction=outputs.reconstruction,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            mask=bool_masked_pos,
            sparsity_loss=terms.sparsity_loss if terms else None,
            singularity_loss=terms.singularity_loss if terms else None,
            ranking_loss=terms.ranking_loss if terms else None,
            heterogeneity=terms.heterogeneity if terms else None,
        )


__all__ = ["SimMIMMTOForMaskedImageModeling", "SimMIMMTOModel", "SimMIMMTOPreTrainedModel", "SimMIMMTOOutput"]


def _register_checkpoint_conversion() -> None:
    """Give our encoder upstream `ViTModel`'s key renaming, looked up by class name (transformers 5 applies a
    conversion mapping only to the class names and `model_type`s it knows, and none to custom code that did not
    register one). Upstream `ViTForMaskedImageModeling` itself has no mapping; its `ViTModel` does.

    Loading then maps the legacy names of upstream's `save_pretrained` and of 4.x checkpoints
    (``encoder.layer.N.attention.attention.query``) to the modules' names, and `save_pretrained` writes upstream's
    names. Done here, in the modeling file, so that `trust_remote_code` loading gets it too.
    """
    register_checkpoint_conversion_mapping(
        SimMIMMTOModel.__name__, get_checkpoint_conversion_mapping(ViTModel.__name__), overwrite=True
    )


_register_checkpoint_conversion()
