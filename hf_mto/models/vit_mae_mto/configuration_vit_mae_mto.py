"""Configuration of ViTMAE with Masked Token Optimization (MTO) in the decoder."""

from huggingface_hub.dataclasses import strict
from transformers import ViTMAEConfig

# A single-dot import: `save_pretrained` copies `mto.py` (this folder's generated copy of `hf_mto/mto.py`) beside
# the checkpoint, so `trust_remote_code` loading works with nothing installed.
from .mto import MTOConfigMixin, document_mto_fields


@strict
@document_mto_fields
class ViTMAEMTOConfig(MTOConfigMixin, ViTMAEConfig):
    r"""
    Configuration of [`ViTMAEMTOForPreTraining`]: every field of [`~transformers.ViTMAEConfig`] plus the MTO fields
    below. The MTO loss *weights* are training arguments (`MTOTrainingArguments`), not model configuration: the
    model returns each raw term and the trainer weights them.

    Args:
        <MTO fields>
        kwargs:
            Every [`~transformers.ViTMAEConfig`] argument (`image_size`, `patch_size`, `mask_ratio`, `norm_pix_loss`,
            decoder sizes, ...).

    Example:

    ```python
    >>> from hf_mto import ViTMAEMTOConfig, ViTMAEMTOForPreTraining

    >>> config = ViTMAEMTOConfig(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2)
    >>> model = ViTMAEMTOForPreTraining(config)
    ```
    """

    model_type = "vit_mae_mto"

    def __post_init__(self, **kwargs):
        # Checked here rather than in `validate_*` methods: those wrap errors in a non-ValueError exception type,
        # and users (and tests) expect a plain ValueError naming the bad value.
        _check_vit_mae_sizes(self)
        self.check_mto_fields(num_states=self.decoder_num_hidden_layers + 1)  # MTO acts on the decoder
        super().__post_init__(**kwargs)


def _as_pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


def _check_vit_mae_sizes(config) -> None:
    if not 0.0 < config.mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {config.mask_ratio}")
    image_size, patch_size = _as_pair(config.image_size), _as_pair(config.patch_size)
    if any(size % patch for size, patch in zip(image_size, patch_size, strict=True)) or min(patch_size) <= 0:
        raise ValueError(
            f"image_size {config.image_size} must be divisible by patch_size {config.patch_size} (and both > 0)"
        )
    for hidden, heads, name in (
        (config.hidden_size, config.num_attention_heads, ""),
        (config.decoder_hidden_size, config.decoder_num_attention_heads, "decoder_"),
    ):
        if heads <= 0 or hidden % heads:
            raise ValueError(f"{name}hidden_size ({hidden}) must be a multiple of {name}num_attention_heads ({heads})")
    if config.decoder_num_hidden_layers < 1:
        raise ValueError(f"decoder_num_hidden_layers must be >= 1, got {config.decoder_num_hidden_layers}")


__all__ = ["ViTMAEMTOConfig"]
