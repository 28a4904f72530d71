"""Configuration of ConMIM (Yi et al., ICLR 2023: masked image modeling with denoising contrast) with Masked Token
Optimization (MTO) in the encoder."""

from huggingface_hub.dataclasses import strict
from transformers import BeitConfig

# A single-dot import: `save_pretrained` copies `mto.py` (this folder's generated copy of `hf_mto/mto.py`) beside
# the checkpoint, so `trust_remote_code` loading works with nothing installed.
from .mto import MTOConfigMixin, document_mto_fields


@strict
@document_mto_fields
class ConMIMMTOConfig(MTOConfigMixin, BeitConfig):
    r"""
    Configuration of [`ConMIMMTOForPreTraining`]: every field of [`~transformers.BeitConfig`] (the encoder is BEiT's:
    a mask token, a relative position bias shared by all blocks, layer scale), the ConMIM fields and the MTO fields
    below. Defaults are the official ConMIM ViT-B/16 ones (TencentARC/ConMIM, `run_conmim_pretraining.py` and
    `modeling_pretrain.py`): LayerNorm eps 1e-6, shared relative position bias and no absolute position embeddings,
    layer scale 0.1, no drop path, a final LayerNorm on every token (no mean pooling), temperature 0.1, momentum
    0.996 -> 1, mask ratio 0.75.

    Args:
        mask_ratio (`float`, *optional*, defaults to 0.75):
            Fraction of patches the trainer masks (the official `--mask_ratio 0.75` with SimMIM's 32-pixel random
            squares, `--mask_type random_mps32`). The model itself takes `bool_masked_pos`.
        contrastive_temperature (`float`, *optional*, defaults to 0.1):
            Temperature of the denoising contrastive loss (official `--temp`), `> 0`.
        teacher_momentum (`float`, *optional*, defaults to 0.996):
            EMA decay of the momentum encoder at the start of training (official `--t_momentum`), in [0, 1]; it rises
            to 1 along a half cosine over training.
        projector_num_layers (`int`, *optional*, defaults to 3):
            Linear layers of the projector applied to every token of the encoder's output (official
            `_build_mlp(3, ...)`); each but the last is followed by BatchNorm and ReLU, the last by a BatchNorm
            without affine parameters. None of the linear layers has a bias.
        projector_hidden_size (`int`, *optional*, defaults to 4096):
            Width of the projector's hidden layers (official `mlp_dim`).
        projector_size (`int`, *optional*, defaults to 256):
            Width of the projected features the loss compares (official `dim`).
        <MTO fields>
        kwargs:
            Every [`~transformers.BeitConfig`] argument (`image_size`, `patch_size`, `hidden_size`,
            `layer_scale_init_value`, `drop_path_rate`, ...). Per-block relative position biases
            (`use_relative_position_bias`) are a fine-tuning option of BEiT, not ConMIM's pre-training, and are
            refused.

    Example:

    ```python
    >>> from hf_mto import ConMIMMTOConfig, ConMIMMTOForPreTraining

    >>> config = ConMIMMTOConfig(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2)
    >>> model = ConMIMMTOForPreTraining(config)
    ```
    """

    model_type = "conmim_mto"

    layer_norm_eps: float = 1e-6
    use_mask_token: bool = True
    use_shared_relative_position_bias: bool = True
    drop_path_rate: float | int = 0.0
    use_mean_pooling: bool = False
    mask_ratio: float = 0.75
    contrastive_temperature: float | int = 0.1
    teacher_momentum: float | int = 0.996
    projector_num_layers: int = 3
    projector_hidden_size: int = 4096
    projector_size: int = 256

    def __post_init__(self, **kwargs):
        # Plain ValueErrors naming the value (the `validate_*` hooks would wrap them in another exception type).
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if not self.contrastive_temperature > 0:
            raise ValueError(f"contrastive_temperature must be > 0, got {self.contrastive_temperature}")
        if not 0 <= self.teacher_momentum <= 1:
            raise ValueError(f"teacher_momentum must be in [0, 1], got {self.teacher_momentum}")
        image_size = self.image_size if isinstance(self.image_size, int) else self.image_size[0]
        patch_size = self.patch_size if isinstance(self.patch_size, int) else self.patch_size[0]
        if patch_size <= 0 or image_size % patch_size:
            raise ValueError(f"image_size {self.image_size} must be divisible by patch_size {self.patch_size}")
        if self.num_attention_heads <= 0 or self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})"
            )
        for name in ("projector_num_layers", "projector_hidden_size", "projector_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.use_mask_token:
            raise ValueError("use_mask_token must be True: ConMIM's encoder puts a mask token on the masked patches")
        if self.use_relative_position_bias:
            raise ValueError(
                "use_relative_position_bias (one bias per block) is not ConMIM's pre-training; it uses the shared "
                "one (use_shared_relative_position_bias)"
            )
        self.check_mto_fields(num_states=self.num_hidden_layers + 1)  # MTO acts on the encoder
        super().__post_init__(**kwargs)


__all__ = ["ConMIMMTOConfig"]
