"""SimMIM (transformers' `ViTForMaskedImageModeling`) with Masked Token Optimization applied in the encoder.

Subclasses upstream: same modules and state-dict keys, same reconstruction (1x1 conv + pixel shuffle) and L1 loss on
the masked pixels. The encoder states MTO needs come from a loop over upstream's own blocks (or from upstream's
`output_hidden_states` when the caller asks for the states), so the configured attention implementation is kept, and
`hidden_states` / `attentions` are upstream's, in patch order, whichever path runs. One deliberate difference: the
mask token is initialised N(0, 0.02) truncated, as in the official SimMIM, where upstream initialises it to zeros.
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
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import resolve_hidden_states_indices, selected_hidden_states

from .configuration_simmim_mto import SimMIMMTOConfig
from .mto import mto_terms, mto_terms_visible_first


@dataclass
class SimMIMMTOOutput(MaskedImageModelingOutput):
    r"""
    Output of [`SimMIMMTOForMaskedImageModeling`]: upstream's fields plus the mask and the raw (unweighted) MTO terms,
    which are `None` when MTO is off or no mask was given.

    loss (`torch.FloatTensor` of shape `()`):
        Upstream's L1 loss on the masked pixels. The MTO terms are *not* added: the trainer weights them.
    mask (`torch.FloatTensor` of shape `(batch_size, num_patches)`):
        The `bool_masked_pos` the forward used as float32, 1 = masked (the convention of `ViTMAEForPreTraining`'s
        `mask`).
    sparsity_loss, singularity_loss, ranking_loss (`torch.FloatTensor` of shape `()`):
        L_spa (Eq. 3, mean over `config.mto_spa_layers`), L_e (Eq. 6), L_r (Eq. 7): batch means.
    heterogeneity (`torch.FloatTensor` of shape `(batch_size, num_hidden_layers + 1)`):
        Heterogeneity H^0..H^L of the encoder (Eq. 2) per image; 0 for an image with no masked or no visible patch.
        `hf_mto.mto.mean_heterogeneity` gives the batch mean the trainer logs.
    """

    mask: torch.FloatTensor | None = None
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

    Rows are picked from ``hidden`` viewed as ``[B * T, D]`` by one `index_select` on flat row indices: on CPU much
    faster than `gather` with the index expanded over D, and a gradient of one `index_select` instead of a zero fill
    plus `scatter_add`.

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

    Without `mto_states` the forward is upstream's. `SimMIMMTOForMaskedImageModeling` passes it when it computes the
    MTO terms and no attentions or hidden states were asked for: the forward then returns the L+1 states (embeddings
    output, each block's output) as `hidden_states` from its own loop over the blocks, which needs none of
    upstream's output-capturing hooks (their lazy installation is a graph break under `torch.compile`).

    - `"patch_order"`: upstream's computation, states in patch order.
    - `"visible_first"` (the eager fast path; the same count masked in every image): the blocks run on the tokens
      reordered as CLS, visible patches, masked patches, and only the final sequence is put back in patch order.
      Every token carries its own position embedding and attention does not depend on token order, so
      `last_hidden_state` is upstream's (up to float summation order), while the states stay in visible-first
      order, already split into visible and masked tokens: the MTO terms need no per-layer token selection.
    """

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.BoolTensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        mto_states: str | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        if mto_states is None:
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
        hidden_states = embeddings
        if mto_states == "visible_first":
            index, inverse = visible_first_order(bool_masked_pos)
            hidden_states = _PermuteTokens.apply(embeddings, index, inverse)
        mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask
        )
        states = [hidden_states]
        for layer in self.layers:
            hidden_states = layer(hidden_states, mask, **kwargs)
            states.append(hidden_states)
        sequence_output = self.layernorm(hidden_states)
        if mto_states == "visible_first":
            sequence_output = _PermuteTokens.apply(sequence_output, inverse, index)
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

    def _common_masked_count(self, bool_masked_pos: torch.Tensor) -> int | None:
        """The number of masked patches when every image masks the same one, strictly between 0 and N, else `None`.

        Every mask generator of hf_mto masks the same count in each image. Reading it makes the host wait for the
        mask (nothing heavier is queued yet), which is why only eager forwards ask.
        """
        fewest, most = torch.stack(torch.aminmax(bool_masked_pos.sum(dim=1))).tolist()  # one host read, not two
        if fewest == most and 0 < most < bool_masked_pos.shape[1]:
            return most
        return None

    def _requested_hidden_states(
        self, states: tuple[torch.Tensor, ...], output_hidden_states: bool | int | list[int] | None
    ) -> tuple[torch.Tensor | None, ...] | None:
        """What upstream returns for `output_hidden_states` (a flag, or the indices to keep), from all L+1 states."""
        if not output_hidden_states:
            return None
        selected = selected_hidden_states(output_hidden_states)
        if selected is None:
            return states
        keep = resolve_hidden_states_indices(self.vit, selected, num_hidden_states=len(states))
        return tuple(state if index in keep else None for index, state in enumerate(states))

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.BoolTensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        use_mto: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SimMIMMTOOutput:
        r"""
        bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, num_patches)`):
            True (or 1) = masked. The generators of `hf_mto.masking` make SimMIM's block masks and the others.
        use_mto (`bool`, *optional*):
            Compute the MTO terms; defaults to `config.use_mto`. They need `bool_masked_pos`; without a mask (e.g.
            feature extraction) none are computed.

        `hidden_states` and `attentions` are upstream's whatever path runs: in patch order, and only when asked for.
        """
        use_mto = (self.config.use_mto if use_mto is None else use_mto) and bool_masked_pos is not None
        if bool_masked_pos is not None:
            bool_masked_pos = self._check_mask(pixel_values, bool_masked_pos)
        output_hidden_states = kwargs.get("output_hidden_states", self.config.output_hidden_states)
        output_attentions = kwargs.get("output_attentions", self.config.output_attentions)
        num_masked = None
        if use_mto and not (output_hidden_states or output_attentions):
            # The visible-first encoder (see SimMIMMTOModel) needs a host read of the mask, which `torch.compile`
            # and `torch.export` cannot trace without a graph break: they take the patch-order states and the
            # mask-based terms, with no data-dependent shape. A padding mask over the tokens stays in patch order.
            if not torch.compiler.is_compiling() and attention_mask is None:
                num_masked = self._common_masked_count(bool_masked_pos)
            kwargs["mto_states"] = "patch_order" if num_masked is None else "visible_first"
        elif use_mto:
            # Asked-for attentions or hidden states come from upstream's forward, in patch order; the MTO terms use
            # the same states.
            kwargs["output_hidden_states"] = True
        outputs = super().forward(
            pixel_values,
            bool_masked_pos=bool_masked_pos,
            interpolate_pos_encoding=interpolate_pos_encoding,
            attention_mask=attention_mask,
            return_dict=True,
            **kwargs,
        )
        hidden_states, terms = outputs.hidden_states, None
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
                terms = mto_terms_visible_first(hidden_states, num_visible, num_prefix_tokens=1, **settings)
            else:
                terms = mto_terms([state[:, 1:] for state in hidden_states], bool_masked_pos, **settings)
            hidden_states = self._requested_hidden_states(hidden_states, output_hidden_states)
        return SimMIMMTOOutput(
            loss=outputs.loss,
            reconstruction=outputs.reconstruction,
            hidden_states=hidden_states,
            attentions=outputs.attentions,
            mask=bool_masked_pos.float() if bool_masked_pos is not None else None,
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
