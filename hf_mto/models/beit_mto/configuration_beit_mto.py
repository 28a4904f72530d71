"""Configuration of BEiT pre-training (transformers' `BeitForMaskedImageModeling`) with Masked Token Optimization in
the encoder, and the image tokenizer whose visual-token ids are its targets."""

from huggingface_hub.dataclasses import strict
from transformers import BeitConfig

# A single-dot import: `save_pretrained` copies `mto.py` (this folder's generated copy of `hf_mto/mto.py`) beside
# the checkpoint, so `trust_remote_code` loading works with nothing installed.
from .mto import MTOConfigMixin, document_mto_fields

# The kinds of image tokenizer (see `modeling_beit_mto.build_image_tokenizer`).
TOKENIZER_TYPES = ("dvae", "kmeans")
# DALL-E's dVAE reads pixels in [0, 1] mapped to [0.1, 0.9] (its `map_pixels`, FLAVA's `codebook_do_map_pixels`):
# 0.8 x + 0.1 = (x - mean) / std with mean -0.125 and std 1.25.
DVAE_IMAGE_MEAN = (-0.125, -0.125, -0.125)
DVAE_IMAGE_STD = (1.25, 1.25, 1.25)


def _side(size) -> int:
    return int(size) if isinstance(size, int) else int(size[0])


@strict
@document_mto_fields
class BeitMTOConfig(MTOConfigMixin, BeitConfig):
    r"""
    Configuration of [`BeitMTOForMaskedImageModeling`]: every field of [`~transformers.BeitConfig`], the masking
    ratio, the image tokenizer and the MTO fields. The MTO loss *weights* are training arguments
    (`MTOTrainingArguments`). The defaults differ from `BeitConfig`'s where the official BEiT pre-training differs: a
    mask token, one relative position bias shared by all blocks, LayerNorm eps 1e-6.

    Args:
        mask_ratio (`float`, *optional*, defaults to 75/196):
            Fraction of patches the trainer masks: BEiT masks 75 of the 196 patches at 224 px
            (`round(mask_ratio * N)` patches). The model itself takes `bool_masked_pos`.
        tokenizer_type (`str`, *optional*, defaults to `"dvae"`):
            The image tokenizer whose ids are the targets: `"dvae"`, a DALL-E-style discrete VAE
            ([`~transformers.FlavaImageCodebook`]); `"kmeans"`, a k-means codebook over the tokenizer view's patches,
            fitted on the training images at the start of the run (no download).
        tokenizer_name_or_path (`str`, *optional*, defaults to `"facebook/flava-image-codebook"`):
            `"dvae"` only: the Hub id or local directory of the `FlavaImageCodebook` weights, used when a checkpoint
            holds no tokenizer of its own (its `image_tokenizer/` folder).
        tokenizer_config (`dict`, *optional*):
            `"dvae"` only: a `FlavaImageCodebookConfig` to build the tokenizer from, randomly initialised, instead
            of loading weights (tests and experiments).
        tokenizer_image_size (`int`, *optional*, defaults to 112):
            Side of the tokenizer's view of each crop (BEiT's `second_input_size`: the dVAE sees 112 px where the
            encoder sees 224). Its token grid must equal the encoder's patch grid.
        tokenizer_image_mean, tokenizer_image_std (`list[float]` or `float`, *optional*, default DALL-E's `map_pixels`):
            Normalisation of the tokenizer's view, `(x - mean) / std` for pixels `x` in [0, 1]; one value per
            channel, or one for all.
        <MTO fields>
        kwargs:
            Every [`~transformers.BeitConfig`] argument; `vocab_size` is the tokenizer's number of codes (the head's
            width).

    Example:

    ```python
    >>> from hf_mto import BeitMTOConfig, BeitMTOForMaskedImageModeling

    >>> config = BeitMTOConfig(
    ...     image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    ...     intermediate_size=64, vocab_size=64, tokenizer_type="kmeans", tokenizer_image_size=32,
    ... )
    >>> model = BeitMTOForMaskedImageModeling(config)
    ```
    """

    model_type = "beit_mto"

    mask_ratio: float = 75 / 196
    tokenizer_type: str = "dvae"
    tokenizer_name_or_path: str | None = "facebook/flava-image-codebook"
    tokenizer_config: dict | None = None
    tokenizer_image_size: int = 112
    tokenizer_image_mean: list[float] | tuple[float, ...] | float = DVAE_IMAGE_MEAN
    tokenizer_image_std: list[float] | tuple[float, ...] | float = DVAE_IMAGE_STD
    use_mask_token: bool = True
    use_shared_relative_position_bias: bool = True
    layer_norm_eps: float = 1e-6

    def __post_init__(self, **kwargs):
        # Plain ValueErrors naming the value (the `validate_*` hooks would wrap them in another exception type).
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        image_size, patch_size = _side(self.image_size), _side(self.patch_size)
        if patch_size <= 0 or image_size % patch_size:
            raise ValueError(f"image_size {self.image_size} must be divisible by patch_size {self.patch_size}")
        if self.num_attention_heads <= 0 or self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if not self.use_mask_token:
            raise ValueError("use_mask_token must be True: BEiT substitutes a mask token for each masked patch")
        self.check_tokenizer_fields()
        self.check_mto_fields(num_states=self.num_hidden_layers + 1)  # MTO acts on the encoder
        super().__post_init__(**kwargs)

    @property
    def patch_grid(self) -> int:
        """Patches per side of the encoder's input: the token grid the tokenizer must produce."""
        return _side(self.image_size) // _side(self.patch_size)

    def check_tokenizer_fields(self) -> None:
        """Raise a `ValueError` naming the first bad tokenizer field."""
        if self.tokenizer_type not in TOKENIZER_TYPES:
            raise ValueError(f"tokenizer_type must be one of {TOKENIZER_TYPES}, got {self.tokenizer_type!r}")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size (the tokenizer's number of codes) must be >= 2, got {self.vocab_size}")
        for name in ("tokenizer_image_mean", "tokenizer_image_std"):
            value = getattr(self, name)
            value = [float(value)] * self.num_channels if isinstance(value, (int, float)) else list(value)
            if len(value) != self.num_channels:
                raise ValueError(f"{name} needs one value per channel ({self.num_channels}), got {value}")
            setattr(self, name, value)  # JSON gives lists; a tuple default would not round-trip
        if any(std <= 0 for std in self.tokenizer_image_std):
            raise ValueError(f"tokenizer_image_std must be > 0, got {self.tokenizer_image_std}")
        if self.tokenizer_image_size <= 0 or self.tokenizer_image_size % self.patch_grid:
            raise ValueError(
                f"tokenizer_image_size {self.tokenizer_image_size} must be a positive multiple of the patch grid "
                f"{self.patch_grid} (image_size / patch_size): each visual token covers one patch"
            )
        if self.tokenizer_type == "dvae" and self.tokenizer_config is not None:
            # FlavaImageCodebook downsamples by 2 in each of its first num_groups - 1 groups.
            factor = 2 ** (self.tokenizer_config.get("num_groups", 4) - 1)
            grid = self.tokenizer_image_size // factor
            if grid != self.patch_grid:
                raise ValueError(
                    f"the dVAE's token grid ({self.tokenizer_image_size} px / {factor} = {grid}) does not match the "
                    f"patch grid {self.patch_grid}: set tokenizer_image_size to {self.patch_grid * factor}"
                )
            codes = self.tokenizer_config.get("vocab_size", 8192)
            if codes != self.vocab_size:
                raise ValueError(f"tokenizer_config has vocab_size {codes}, the model's head {self.vocab_size}")


__all__ = ["BeitMTOConfig"]
