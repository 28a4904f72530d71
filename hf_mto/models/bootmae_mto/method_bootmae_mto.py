"""BootMAE + MTO as generic code sees it (see `hf_mto.methods`). Not imported by the modeling files, so not part of
the remote code saved beside checkpoints."""

from __future__ import annotations

import torch

from ...methods import KeptCountMethod, decoder_row, register_method
from .configuration_bootmae_mto import BootMAEMTOConfig
from .modeling_bootmae_mto import PIXEL_NORM_EPS, BootMAEMTOForPreTraining, BootMAEMTOModel


@register_method
class BootMAEMTOMethod(KeptCountMethod):
    """BootMAE: masks reach the model as MAE's do (``noise``); the default masking is the official one,
    `bootmae_block`: BEiT's rectangles over 120 of 196 patches (at most 60 each), topped up with random patches to
    ``round(mask_ratio * N)`` (147 of 196). Not reproduced: the official code's per-batch roll, which makes 0-3 of
    the block-masked patches visible, and its unbounded retries (BEiT's 10 attempts here, then the random top-up).
    MTO acts on both decoders; after every optimizer step the momentum encoder takes one EMA step
    (`on_step_end`)."""

    name = "BootMAE"
    config_class = BootMAEMTOConfig
    model_class = BootMAEMTOForPreTraining
    base_model_class = BootMAEMTOModel
    auto_class_name = "AutoModelForPreTraining"
    extends = ()  # no upstream BootMAE
    default_masking = "bootmae_block"
    mto_stacks = ("pixel_decoder", "feature_decoder")
    citation = """\
@inproceedings{dong2022bootmae,
  title     = {Bootstrapped Masked Autoencoders for Vision BERT Pretraining},
  author    = {Dong, Xiaoyi and Bao, Jianmin and Zhang, Ting and Chen, Dongdong and Zhang, Weiming and Yuan, Lu and Chen, Dong and Wen, Fang and Yu, Nenghai},
  booktitle = {European Conference on Computer Vision (ECCV)},
  year      = {2022}
}"""
    card_notes = (
        "This is the online encoder of BootMAE (not its momentum encoder). BootMAE's position embeddings are a fixed "
        "2-D sin-cos table (MoCo v3 layout) that was frozen during pre-training. Here they are ordinary (trainable) "
        "ViT position embeddings holding the same values; freeze `vit.embeddings.position_embeddings` to keep them "
        "fixed while fine-tuning. `encoder_stride` (absent from ViTMAE's config) is set to `patch_size`."
    )

    @classmethod
    def card_architecture(cls, config) -> list[tuple[str, str]]:
        pixel_target = "per-patch, per-channel normalised pixels" if config.norm_pix_loss else "pixels"
        feature = (
            f"{config.feature_decoder_num_hidden_layers} blocks at the encoder's width, cross-attending to the "
            "encoder's last block"
        )
        schedule = ", ".join(f"{decay:g} at t = {progress:g}" for progress, decay in config.momentum_schedule)
        return [
            decoder_row(config, "pixel decoder"),
            ("feature decoder", feature),
            ("targets", f"{pixel_target}; the momentum encoder's last-block features of the whole image"),
            (
                "feature loss weight",
                f"{config.feature_weight:g}, ramped from 0 over the first {config.feature_weight_warmup:g} of training",
            ),
            ("momentum encoder EMA decay", f"{schedule} (linear between, constant after)"),
        ]

    @classmethod
    def loss_components(cls, outputs) -> dict[str, torch.Tensor]:
        """The pixel loss (as the other methods' reconstruction loss) and the unweighted feature loss."""
        return {"reconstruction_loss": outputs.pixel_loss, "feature_loss": outputs.feature_loss}

    @classmethod
    def on_step_end(cls, model, progress: float) -> None:
        """One EMA step of the momentum encoder at the progress after this optimizer step (which the model also
        keeps for its feature-weight ramp)."""
        model.update_teacher(progress)

    @classmethod
    def prediction_to_pixels(cls, model, pixel_values: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Predicted patches ``[B, N, P*P*C]`` -> image ``[B, C, H, W]`` float32 in the normalised space of
        ``pixel_values``. With `norm_pix_loss` the model predicts each patch normalised per channel; those statistics
        are taken from the original image's patch and put back (the inverse of `BootMAEMTOForPreTraining.pixel_target`)."""
        prediction = logits.float()
        if model.config.norm_pix_loss:
            target = model.patchify(pixel_values.float())
            per_channel = target.view(*target.shape[:2], -1, model.config.num_channels)
            mean = per_channel.mean(dim=2, keepdim=True)
            var = per_channel.var(dim=2, unbiased=False, keepdim=True)
            prediction = (prediction.view_as(per_channel) * (var + PIXEL_NORM_EPS) ** 0.5 + mean).view_as(target)
        return model.unpatchify(prediction, original_image_size=tuple(pixel_values.shape[-2:]))

    @classmethod
    def analysis_pass(cls, model, pixel_values: torch.Tensor, mask_inputs: dict[str, torch.Tensor]):
        """Both decoders' states (the two MTO stacks) in patch order, the mask and the pixel reconstruction; see
        `PreTrainingMethod.analysis_pass`."""
        encoded = model.vit(pixel_values, noise=mask_inputs["noise"], output_hidden_states=True)
        pixels, pixel_states = model.pixel_decoder(
            encoded.last_hidden_state, encoded.hidden_states[1], encoded.ids_restore, output_hidden_states=True
        )
        _, feature_states = model.feature_decoder(
            encoded.last_hidden_state,
            encoded.hidden_states[-1],
            encoded.ids_restore,
            position_embeddings=model.vit.embeddings.position_embeddings,
            output_hidden_states=True,
        )
        # The decoders return their states in the encoder's order (CLS, visible, masked); put them in patch order.
        states = {}
        for stack, stack_states in (("pixel_decoder", pixel_states), ("feature_decoder", feature_states)):
            index = encoded.ids_restore.unsqueeze(-1).expand(-1, -1, stack_states[0].shape[-1])
            states[stack] = [torch.gather(state[:, 1:].float(), 1, index) for state in stack_states]
        return states, encoded.mask.bool(), cls.prediction_to_pixels(model, pixel_values, pixels)
