"""Configuration of BootMAE with Masked Token Optimization (MTO) in both of its decoders."""

from huggingface_hub.dataclasses import strict
from transformers import ViTMAEConfig

# A single-dot import: `save_pretrained` copies `mto.py` (this folder's generated copy of `hf_mto/mto.py`) beside
# the checkpoint, so `trust_remote_code` loading works with nothing installed.
from .mto import MTOConfigMixin, document_mto_fields

# The official ViT-B/16 schedule (`--model_ema_decay 0.999 --model_ema_dynamic`, 800 epochs): 0.999 -> 0.9999 over
# epochs 0-100, -> 0.99999 by epoch 400, then constant; here as points of the training progress t = epoch / 800.
DEFAULT_MOMENTUM_SCHEDULE = [[0.0, 0.999], [0.125, 0.9999], [0.5, 0.99999]]


@strict
@document_mto_fields
class BootMAEMTOConfig(MTOConfigMixin, ViTMAEConfig):
    r"""
    Configuration of [`BootMAEMTOForPreTraining`] (BootMAE, Dong et al. 2022, with MTO on both decoders): every field
    of [`~transformers.ViTMAEConfig`] (the encoder's; its `decoder_*` fields size the *pixel* decoder), the BootMAE
    fields and the MTO fields below. Defaults are the official BootMAE ViT-B/16 ones: LayerNorm eps 1e-6, q/v bias,
    mask ratio 0.75, two 2-block decoders, the pixel decoder 512 wide with 12 heads.

    The pixel decoder's heads are `decoder_hidden_size // decoder_num_attention_heads` wide, as in the official code
    (512 wide with 12 heads gives heads of 42 and an attention width of 504); the feature decoder has the encoder's
    width, heads and MLP size.

    Args:
        norm_pix_loss (`bool`, *optional*, defaults to `True`):
            Regress normalised pixels: each patch is normalised *per channel* by its own mean and (biased) variance,
            `(x - mean) / sqrt(var + 1e-5)`, as the official BootMAE does (not MAE's normalisation over all the
            values of a patch jointly). `False` regresses the raw pixel values (an ablation).
        feature_decoder_num_hidden_layers (`int`, *optional*, defaults to 2):
            Blocks of the feature decoder (each self-attention, cross-attention to the encoder, MLP).
        feature_weight (`float`, *optional*, defaults to 1.0):
            Weight of the feature-prediction loss at the end of its ramp (`>= 0`).
        feature_weight_warmup (`float`, *optional*, defaults to 0.25):
            Fraction of training (progress t in [0, 1]) over which the feature weight ramps linearly from 0 to
            `feature_weight`, in optimizer steps (the official code ramps per epoch, over the first 25 % of epochs).
            0 gives the full weight from the start.
        momentum_schedule (`list[list[float]]`, *optional*, defaults to `[[0.0, 0.999], [0.125, 0.9999], [0.5, 0.99999]]`):
            EMA decay of the momentum encoder as `[progress, decay]` points, progress increasing from 0, decays in
            [0, 1]: linearly interpolated in the training progress t, constant after the last point. The default is
            the official ViT-B/16 800-epoch schedule (0.999 -> 0.9999 over epochs 0-100 -> 0.99999 by epoch 400),
            expressed per optimizer step instead of per epoch.
        weight_mask (`bool`, *optional*, defaults to `True`):
            Weight each masked patch's loss by `1 + (masked patches in its 3x3 neighbourhood) / 9` (the official
            `--weight_mask`); the loss is still divided by the number of masked patches.
        <MTO fields>
        kwargs:
            Every [`~transformers.ViTMAEConfig`] argument (`image_size`, `patch_size`, `mask_ratio`, the pixel
            decoder's `decoder_*` sizes, ...).

    Example:

    ```python
    >>> from hf_mto import BootMAEMTOConfig, BootMAEMTOForPreTraining

    >>> config = BootMAEMTOConfig(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2)
    >>> model = BootMAEMTOForPreTraining(config)
    ```
    """

    model_type = "bootmae_mto"

    layer_norm_eps: float = 1e-6
    decoder_num_attention_heads: int = 12
    decoder_hidden_size: int = 512
    decoder_num_hidden_layers: int = 2
    decoder_intermediate_size: int = 2048
    norm_pix_loss: bool = True
    feature_decoder_num_hidden_layers: int = 2
    feature_weight: float | int = 1.0
    feature_weight_warmup: float | int = 0.25
    momentum_schedule: list | tuple | None = None
    weight_mask: bool = True

    def __post_init__(self, **kwargs):
        # Checked here rather than in `validate_*` methods: those wrap errors in a non-ValueError exception type,
        # and users (and tests) expect a plain ValueError naming the bad value.
        if self.momentum_schedule is None:
            self.momentum_schedule = [list(point) for point in DEFAULT_MOMENTUM_SCHEDULE]
        self.momentum_schedule = [list(point) for point in self.momentum_schedule]  # JSON gives lists
        _check_bootmae_fields(self)
        # MTO acts on both decoders: its fields must hold for each
        for depth in (self.decoder_num_hidden_layers, self.feature_decoder_num_hidden_layers):
            self.check_mto_fields(num_states=depth + 1)
        super().__post_init__(**kwargs)


def _as_pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


def _check_bootmae_fields(config) -> None:
    if not 0.0 < config.mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {config.mask_ratio}")
    image_size, patch_size = _as_pair(config.image_size), _as_pair(config.patch_size)
    if min(patch_size) <= 0 or any(size % patch for size, patch in zip(image_size, patch_size, strict=True)):
        raise ValueError(
            f"image_size {config.image_size} must be divisible by patch_size {config.patch_size} (and both > 0)"
        )
    if config.num_attention_heads <= 0 or config.hidden_size % config.num_attention_heads:
        raise ValueError(
            f"hidden_size ({config.hidden_size}) must be a multiple of num_attention_heads "
            f"({config.num_attention_heads})"
        )
    if not 0 < config.decoder_num_attention_heads <= config.decoder_hidden_size:
        raise ValueError(
            f"decoder_num_attention_heads ({config.decoder_num_attention_heads}) must be in "
            f"[1, decoder_hidden_size ({config.decoder_hidden_size})]"
        )
    for name in ("decoder_num_hidden_layers", "feature_decoder_num_hidden_layers", "decoder_intermediate_size"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    if not config.feature_weight >= 0:
        raise ValueError(f"feature_weight must be >= 0, got {config.feature_weight}")
    if not 0 <= config.feature_weight_warmup <= 1:
        raise ValueError(f"feature_weight_warmup must be in [0, 1], got {config.feature_weight_warmup}")
    _check_momentum_schedule(config.momentum_schedule)


def _check_momentum_schedule(schedule) -> None:
    if not schedule or any(not isinstance(point, (list, tuple)) or len(point) != 2 for point in schedule):
        raise ValueError(f"momentum_schedule must be a non-empty list of [progress, decay] pairs, got {schedule}")
    progress = [point[0] for point in schedule]
    if progress[0] != 0 or any(b <= a for a, b in zip(progress, progress[1:], strict=False)) or progress[-1] > 1:
        raise ValueError(
            f"momentum_schedule progress points must start at 0 and increase strictly up to at most 1, got {schedule}"
        )
    bad = [point[1] for point in schedule if not 0 <= point[1] <= 1]
    if bad:
        raise ValueError(f"momentum_schedule decays must be in [0, 1], got {bad} in {schedule}")


__all__ = ["BootMAEMTOConfig"]
