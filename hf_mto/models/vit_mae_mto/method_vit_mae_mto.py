"""MAE + MTO as generic code sees it (see `hf_mto.methods`). Not imported by the modeling files, so not part of the
remote code saved beside checkpoints."""

from __future__ import annotations

import torch
from transformers import ViTMAEForPreTraining, ViTMAEModel

from ...masking import mask_to_noise
from ...methods import PreTrainingMethod, register_method
from .configuration_vit_mae_mto import ViTMAEMTOConfig
from .modeling_vit_mae_mto import ViTMAEMTOForPreTraining, ViTMAEMTOModel


@register_method
class ViTMAEMTOMethod(PreTrainingMethod):
    name = "MAE"
    config_class = ViTMAEMTOConfig
    model_class = ViTMAEMTOForPreTraining
    auto_class_name = "AutoModelForPreTraining"
    extends = (ViTMAEForPreTraining,)
    extends_model_types = ("vit_mae",)
    encoder_classes = (ViTMAEMTOModel, ViTMAEModel)
    mask_input_name = "noise"
    default_masking = "random"
    own_masking = "random"  # MAE draws its own random mask from its noise: upstream's path, same distribution
    mto_stacks = ("decoder",)
    card_notes = (
        "MAE's position embeddings are a fixed 2-D sin-cos table that was frozen during pre-training. Here they are "
        "ordinary (trainable) ViT position embeddings holding the same values; freeze "
        "`vit.embeddings.position_embeddings` to keep them fixed while fine-tuning. `encoder_stride` (absent from "
        "ViTMAE's config) is set to `patch_size`."
    )

    @staticmethod
    def model_num_masked(config, num_patches: int) -> int:
        """MAE keeps ``int(N * (1 - mask_ratio))`` patches whatever its noise says."""
        return num_patches - int(num_patches * (1 - config.mask_ratio))

    @classmethod
    def num_masked(cls, config, num_patches: int, drawn: int) -> int:
        expected = cls.model_num_masked(config, num_patches)
        if drawn != expected:
            raise ValueError(
                f"the masking masks {drawn} of {num_patches} patches per image but MAE with mask_ratio "
                f"{config.mask_ratio} masks {expected}: choose a mask_ratio for which they agree "
                f"(e.g. {drawn / num_patches})"
            )
        return drawn

    @classmethod
    def mask_inputs(cls, model, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        expected = cls.model_num_masked(model.config, mask.shape[1])
        return {"noise": mask_to_noise(mask, expected_num_masked=expected)}
