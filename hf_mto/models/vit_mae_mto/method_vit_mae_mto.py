"""MAE + MTO as generic code sees it (see `hf_mto.methods`). Not imported by the modeling files, so not part of the
remote code saved beside checkpoints."""

from __future__ import annotations

import torch
from transformers import ViTMAEForPreTraining, ViTMAEModel

from ...methods import KeptCountMethod, decoder_row, register_method
from .configuration_vit_mae_mto import ViTMAEMTOConfig
from .modeling_vit_mae_mto import ViTMAEMTOForPreTraining, ViTMAEMTOModel


@register_method
class ViTMAEMTOMethod(KeptCountMethod):
    name = "MAE"
    config_class = ViTMAEMTOConfig
    model_class = ViTMAEMTOForPreTraining
    base_model_class = ViTMAEMTOModel
    auto_class_name = "AutoModelForPreTraining"
    extends = (ViTMAEForPreTraining,)
    upstream_encoder_classes = (ViTMAEModel,)
    default_masking = "random"
    own_masking = "random"  # MAE draws its own random mask from its noise: upstream's path, same distribution
    mto_stacks = ("decoder",)
    citation = """\
@inproceedings{he2022mae,
  title     = {Masked Autoencoders Are Scalable Vision Learners},
  author    = {He, Kaiming and Chen, Xinlei and Xie, Saining and Li, Yanghao and Doll{\'a}r, Piotr and Girshick, Ross},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2022}
}"""
    card_notes = (
        "MAE's position embeddings are a fixed 2-D sin-cos table that was frozen during pre-training. Here they are "
        "ordinary (trainable) ViT position embeddings holding the same values; freeze "
        "`vit.embeddings.position_embeddings` to keep them fixed while fine-tuning. `encoder_stride` (absent from "
        "ViTMAE's config) is set to `patch_size`."
    )

    @classmethod
    def card_architecture(cls, config) -> list[tuple[str, str]]:
        target = "per-patch normalised pixels" if config.norm_pix_loss else "pixels"
        return [decoder_row(config), ("reconstruction target", target)]

    @classmethod
    def own_mask_inputs(
        cls, model, batch_size: int, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """``{"noise": [B, N]}`` uniform noise, as MAE draws it: it keeps the patches of the lowest noise."""
        return {"noise": torch.rand(batch_size, cls.num_patches(model), generator=generator)}

    @classmethod
    def prediction_to_pixels(cls, model, pixel_values: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """MAE's predicted patches ``[B, N, P*P*C]`` -> image ``[B, C, H, W]`` float32 in the normalised space of
        ``pixel_values``.

        With `norm_pix_loss` the model predicts each patch normalised by its own mean and variance; as the official
        MAE visualisation does, those statistics are taken from the original image's patch and put back
        (``pred * sqrt(var + 1e-6) + mean``, the inverse of the loss's target normalisation).
        """
        prediction = logits.float()
        if model.config.norm_pix_loss:
            target = model.patchify(pixel_values.float())
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            prediction = prediction * (var + 1.0e-6) ** 0.5 + mean
        return model.unpatchify(prediction, original_image_size=tuple(pixel_values.shape[-2:]))

    @classmethod
    def analysis_pass(cls, model, pixel_values: torch.Tensor, mask_inputs: dict[str, torch.Tensor]):
        """The decoder's states (MAE's MTO stack) in patch order, the mask and the reconstruction; see
        `PreTrainingMethod.analysis_pass`."""
        encoded = model.vit(pixel_values, noise=mask_inputs["noise"])
        # The decoder returns its states in MAE's shuffled order (CLS, visible, masked); put them in patch order.
        decoded = model.decoder(encoded.last_hidden_state, encoded.ids_restore, output_hidden_states=True)
        index = encoded.ids_restore.unsqueeze(-1).expand(-1, -1, decoded.hidden_states[0].shape[-1])
        states = [torch.gather(state[:, 1:].float(), 1, index) for state in decoded.hidden_states]
        return {"decoder": states}, encoded.mask.bool(), cls.prediction_to_pixels(model, pixel_values, decoded.logits)
