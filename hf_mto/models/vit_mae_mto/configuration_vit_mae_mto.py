"""Configuration of ViTMAE with Masked Token Optimization (MTO) in the decoder."""

from huggingface_hub.dataclasses import strict
from transformers import ViTMAEConfig

# `mto.py` in this folder is a link to `hf_mto/mto.py`: a single-dot import is what lets `save_pretrained` copy it
# beside the checkpoint, so `trust_remote_code` loading works with nothing installed.
from .mto import check_mto_settings


@strict
class ViTMAEMTOConfig(ViTMAEConfig):
    r"""
    Configuration of [`ViTMAEMTOForPreTraining`]: every field of [`~transformers.ViTMAEConfig`] plus the MTO fields
    below. The MTO loss *weights* are training arguments (`MTOTrainingArguments`), not model configuration: the
    model returns each raw term and the trainer weights them.

    Args:
        use_mto (`bool`, *optional*, defaults to `True`):
            Whether `forward` computes the MTO terms (decoder states H^0..H^L, heterogeneity, L_spa, L_e, L_r). When
            `False` none of that work is done and the model costs what upstream `ViTMAEForPreTraining` costs. Can be
            overridden per call with `forward(use_mto=...)`.
        mto_spa_layers (`list[int]`, *optional*, defaults to `[0]`):
            Decoder states where the sparsity loss L_spa applies: 0 is the decoder input (after `decoder_embed`,
            mask-token insertion and position embedding), l is the output of decoder block l. The paper uses `[0]`,
            "the initial embedding stage".
        mto_affinity (`str`, *optional*, defaults to `"scaled"`):
            Affinity logits between tokens: `"scaled"` (dot product divided by sqrt(decoder_hidden_size), attention's
            convention), `"dot"` (the raw dot product, as the paper writes it; at ViT-B widths it saturates the
            softmax, so L_spa vanishes with zero gradient) or `"cosine"` (cosine similarity divided by
            `mto_temperature`).
        mto_temperature (`float`, *optional*, defaults to 0.1):
            Temperature of the `"cosine"` affinity; unused otherwise.
        mto_ranking (`str`, *optional*, defaults to `"intended"`):
            Direction of the ranking loss L_r: `"intended"` pushes each layer's heterogeneity below the previous
            one's (the paper's text); `"literal"` is Eq. 7 as printed (for ablations).
        mto_eps (`float`, *optional*, defaults to 1e-6):
            The epsilon of L_e = 1 / (H^0 + eps).
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

    use_mto: bool = True
    mto_spa_layers: list[int] | tuple[int, ...] = (0,)
    mto_affinity: str = "scaled"
    mto_temperature: float | int = 0.1
    mto_ranking: str = "intended"
    mto_eps: float = 1e-6

    def __post_init__(self, **kwargs):
        # Checked here rather than in `validate_*` methods: those wrap errors in a non-ValueError exception type,
        # and users (and tests) expect a plain ValueError naming the bad value.
        self.mto_spa_layers = list(self.mto_spa_layers)
        _check_vit_mae_sizes(self)
        check_mto_settings(
            spa_layers=self.mto_spa_layers,
            affinity=self.mto_affinity,
            temperature=self.mto_temperature,
            eps=self.mto_eps,
            ranking=self.mto_ranking,
            num_states=self.decoder_num_hidden_layers + 1,
        )
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
