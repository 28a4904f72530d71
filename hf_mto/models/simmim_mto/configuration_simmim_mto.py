"""Configuration of SimMIM (transformers' `ViTForMaskedImageModeling`) with Masked Token Optimization in the encoder."""

from huggingface_hub.dataclasses import strict
from transformers import ViTConfig

# A single-dot import: `save_pretrained` copies `mto.py` (this folder's generated copy of `hf_mto/mto.py`) beside
# the checkpoint, so `trust_remote_code` loading works with nothing installed.
from .mto import MTOConfigMixin, document_mto_fields


@strict
@document_mto_fields
class SimMIMMTOConfig(MTOConfigMixin, ViTConfig):
    r"""
    Configuration of [`SimMIMMTOForMaskedImageModeling`]: every field of [`~transformers.ViTConfig`] plus the masking
    ratio and the MTO fields. The MTO loss *weights* are training arguments (`MTOTrainingArguments`).

    Args:
        mask_ratio (`float`, *optional*, defaults to 0.6):
            Fraction of patches the trainer masks (SimMIM's 0.6). The model itself takes `bool_masked_pos`.
        <MTO fields>
        kwargs:
            Every [`~transformers.ViTConfig`] argument. `encoder_stride` must equal `patch_size` (SimMIM's
            one-convolution pixel-shuffle head reconstructs each patch).

    Example:

    ```python
    >>> from hf_mto import SimMIMMTOConfig, SimMIMMTOForMaskedImageModeling

    >>> config = SimMIMMTOConfig(image_size=32, patch_size=4, encoder_stride=4, hidden_size=32, num_hidden_layers=2)
    >>> model = SimMIMMTOForMaskedImageModeling(config)
    ```
    """

    model_type = "simmim_mto"

    mask_ratio: float = 0.6

    def __post_init__(self, **kwargs):
        # Plain ValueErrors naming the value (the `validate_*` hooks would wrap them in another exception type).
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        image_size = self.image_size if isinstance(self.image_size, int) else self.image_size[0]
        patch_size = self.patch_size if isinstance(self.patch_size, int) else self.patch_size[0]
        if patch_size <= 0 or image_size % patch_size:
            raise ValueError(f"image_size {self.image_size} must be divisible by patch_size {self.patch_size}")
        if self.encoder_stride != patch_size:
            raise ValueError(
                f"encoder_stride ({self.encoder_stride}) must equal patch_size ({patch_size}) for SimMIM's head"
            )
        if self.num_attention_heads <= 0 or self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})"
            )
        self.check_mto_fields(num_states=self.num_hidden_layers + 1)  # MTO acts on the encoder
        super().__post_init__(**kwargs)


__all__ = ["SimMIMMTOConfig"]
