"""Configuration of SimMIM (transformers' `ViTForMaskedImageModeling`) with Masked Token Optimization in the encoder."""

from huggingface_hub.dataclasses import strict
from transformers import ViTConfig

# `mto.py` in this folder is a link to `hf_mto/mto.py`: a single-dot import is what lets `save_pretrained` copy it
# beside the checkpoint, so `trust_remote_code` loading works with nothing installed.
from .mto import check_mto_settings


@strict
class SimMIMMTOConfig(ViTConfig):
    r"""
    Configuration of [`SimMIMMTOForMaskedImageModeling`]: every field of [`~transformers.ViTConfig`] plus the masking
    ratio and the MTO fields. The MTO loss *weights* are training arguments (`MTOTrainingArguments`).

    Args:
        mask_ratio (`float`, *optional*, defaults to 0.6):
            Fraction of patches the trainer masks (SimMIM's 0.6). The model itself takes `bool_masked_pos`.
        use_mto (`bool`, *optional*, defaults to `True`):
            Whether `forward` computes the MTO terms on the encoder states (H^0 = embeddings output with the mask
            token substituted plus position embedding, H^l = output of block l). When `False` none of that work is
            done. Can be overridden per call with `forward(use_mto=...)`.
        mto_spa_layers (`list[int]`, *optional*, defaults to `[0]`):
            Encoder states where the sparsity loss L_spa applies (0 = the embeddings output).
        mto_affinity (`str`, *optional*, defaults to `"scaled"`):
            `"scaled"` (dot product divided by sqrt(hidden_size), attention's convention), `"dot"` (the raw dot
            product, as the paper writes it; at ViT-B widths it saturates the softmax, so L_spa vanishes with zero
            gradient) or `"cosine"` (cosine similarity divided by `mto_temperature`).
        mto_temperature (`float`, *optional*, defaults to 0.1):
            Temperature of the `"cosine"` affinity.
        mto_ranking (`str`, *optional*, defaults to `"intended"`):
            `"intended"` (heterogeneity decreasing with depth, the paper's text) or `"literal"` (Eq. 7 as printed).
        mto_eps (`float`, *optional*, defaults to 1e-6):
            The epsilon of L_e = 1 / (H^0 + eps).
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
    use_mto: bool = True
    mto_spa_layers: list[int] | tuple[int, ...] = (0,)
    mto_affinity: str = "scaled"
    mto_temperature: float | int = 0.1
    mto_ranking: str = "intended"
    mto_eps: float = 1e-6

    def __post_init__(self, **kwargs):
        # Plain ValueErrors naming the value (the `validate_*` hooks would wrap them in another exception type).
        self.mto_spa_layers = list(self.mto_spa_layers)
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
        check_mto_settings(
            spa_layers=self.mto_spa_layers,
            affinity=self.mto_affinity,
            temperature=self.mto_temperature,
            eps=self.mto_eps,
            ranking=self.mto_ranking,
            num_states=self.num_hidden_layers + 1,
        )
        super().__post_init__(**kwargs)


__all__ = ["SimMIMMTOConfig"]
