"""SimMIM + MTO as generic code sees it (see `hf_mto.methods`). Not imported by the modeling files, so not part of the
remote code saved beside checkpoints."""

from __future__ import annotations

import torch
from transformers import ViTForMaskedImageModeling, ViTModel

from ...methods import PreTrainingMethod, register_method
from .configuration_simmim_mto import SimMIMMTOConfig
from .modeling_simmim_mto import SimMIMMTOForMaskedImageModeling, SimMIMMTOModel


@register_method
class SimMIMMTOMethod(PreTrainingMethod):
    name = "SimMIM"
    config_class = SimMIMMTOConfig
    model_class = SimMIMMTOForMaskedImageModeling
    base_model_class = SimMIMMTOModel
    auto_class_name = "AutoModelForMaskedImageModeling"
    extends = (ViTForMaskedImageModeling,)
    upstream_encoder_classes = (ViTModel,)
    mask_input_name = "bool_masked_pos"
    default_masking = "simmim_block"
    mto_stacks = ("encoder",)
    export_dropped_keys = ("embeddings.mask_token",)
    citation = """\
@inproceedings{xie2022simmim,
  title     = {SimMIM: A Simple Framework for Masked Image Modeling},
  author    = {Xie, Zhenda and Zhang, Zheng and Cao, Yue and Lin, Yutong and Bao, Jianmin and Yao, Zhuliang and Dai, Qi and Hu, Han},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2022}
}"""
    card_notes = (
        "SimMIM's mask token and reconstruction head were dropped; the position embeddings are the learned ones."
    )

    @classmethod
    def analysis_pass(cls, model, pixel_values: torch.Tensor, mask_inputs: dict[str, torch.Tensor]):
        """The encoder's states (SimMIM's MTO stack, already in patch order), the mask and the reconstruction; see
        `PreTrainingMethod.analysis_pass`."""
        outputs = model(pixel_values, use_mto=False, output_hidden_states=True, **mask_inputs)
        states = [state[:, 1:].float() for state in outputs.hidden_states]
        return {"encoder": states}, outputs.mask.bool(), outputs.reconstruction.float()
