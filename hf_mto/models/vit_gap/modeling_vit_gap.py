"""ViT image classifier on the global average of the patch tokens, as the official MAE fine-tuning (`global_pool`).

MAE's fine-tuning head is `head(fc_norm(mean of the patch tokens))`, where the patch tokens are the output of the
last block *before* any final norm: the encoder's final norm is removed and a new `fc_norm` (LayerNorm, initialised
to identity) normalises the pooled vector. Here that is transformers' `ViTModel` with its `layernorm` replaced by an
identity, a new `fc_norm` and the usual `classifier`. The encoder weights keep their `ViTModel` names, so any ViT
checkpoint (an `hf_mto` export, `google/vit-*`) loads into it: the checkpoint's final `vit.layernorm` is ignored and
`fc_norm` and `classifier` are newly initialised, as in MAE.
"""

import torch
from torch import nn
from transformers import ViTModel
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.models.vit.modeling_vit import ViTPreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple

from .configuration_vit_gap import ViTGAPConfig


class ViTGAPModel(ViTModel):
    """The encoder of [`ViTGAPForImageClassification`] (what `AutoModel` gives for its checkpoints): transformers'
    `ViTModel` without the final norm (it moves after the pooling, `fc_norm`) and without a pooler."""

    config_class = ViTGAPConfig

    def __init__(self, config: ViTGAPConfig, use_mask_token: bool = False):
        super().__init__(config, add_pooling_layer=False, use_mask_token=use_mask_token)
        self.layernorm = nn.Identity()


class ViTGAPForImageClassification(ViTPreTrainedModel):
    r"""ViT with a linear classifier on `fc_norm(mean of the patch tokens)` (MAE's global average pooling).

    Same inputs and outputs as [`~transformers.ViTForImageClassification`]; only the pooling differs.
    """

    config: ViTGAPConfig
    # A plain ViT checkpoint's final norm has no place here (MAE deletes it too).
    _keys_to_ignore_on_load_unexpected = [r"vit\.layernorm\.", r"vit\.pooler\."]

    def __init__(self, config: ViTGAPConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vit = ViTGAPModel(config)
        self.fc_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    def pool(self, last_hidden_state: torch.Tensor) -> torch.Tensor:
        """``[B, 1 + N, D]`` encoder output (CLS first, no final norm) -> ``[B, D]`` normalised patch-token mean."""
        return self.fc_norm(last_hidden_state[:, 1:, :].mean(dim=1))

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ImageClassifierOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Images.
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Class indices for the loss (cross-entropy; regression / multi-label per `config.problem_type`).
        """
        outputs = self.vit(
            pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, attention_mask=attention_mask, **kwargs
        )
        logits = self.classifier(self.pool(outputs.last_hidden_state))
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config, **kwargs)
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


# transformers 5 renames legacy checkpoint keys (``encoder.layer.N.attention.attention.query``, as every ViT checkpoint
# and upstream's `save_pretrained` write them) by class name: our encoder takes upstream `ViTModel`'s renaming.
register_checkpoint_conversion_mapping(
    ViTGAPModel.__name__, get_checkpoint_conversion_mapping(ViTModel.__name__), overwrite=True
)

__all__ = ["ViTGAPForImageClassification", "ViTGAPModel"]
