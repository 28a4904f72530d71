"""Training arguments: `ScaledLRTrainingArguments` (MAE's learning-rate rule and the CPU multi-process set-up, shared
with fine-tuning) and `MTOTrainingArguments` (the MTO loss weights, the masking and the evolved-masking schedule)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from .masking import MASKING_STRATEGIES

TRAINER_MASKING = (*MASKING_STRATEGIES, "evolved")


@dataclass
class ScaledLRTrainingArguments(TrainingArguments):
    """`TrainingArguments` with MAE's and SimMIM's learning-rate rule, lr = base lr x total batch / reference batch,
    and a multi-process launch on a machine without an accelerator set up as a gloo (CPU) run. Shared by
    `MTOTrainingArguments` (pre-training) and `hf_mto.finetuning.FinetuneTrainingArguments`."""

    base_learning_rate: float | None = field(
        default=1.5e-4,
        metadata={
            "help": "Base learning rate: the absolute learning_rate is base_learning_rate x total batch size / "
            "lr_scaling_batch_size (total batch = per-device batch x gradient accumulation x processes), as in MAE "
            "and SimMIM. Set to null (YAML/JSON) to use --learning_rate as given."
        },
    )
    lr_scaling_batch_size: int = field(
        default=256, metadata={"help": "Batch size the base learning rate refers to: 256 for MAE, 512 for SimMIM."}
    )

    def __post_init__(self):
        if self.base_learning_rate is not None and not self.base_learning_rate > 0:
            raise ValueError(f"base_learning_rate must be > 0 (or null), got {self.base_learning_rate}")
        if self.lr_scaling_batch_size <= 0:
            raise ValueError(f"lr_scaling_batch_size must be > 0, got {self.lr_scaling_batch_size}")
        if not self.use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available():
            # A multi-process launch (torchrun, accelerate) on a machine without an accelerator: unless told to use
            # the CPU, accelerate would not set up the gloo process group and each process would silently train
            # alone on the whole dataset.
            self.use_cpu = True
        super().__post_init__()
        if self.base_learning_rate is not None:
            self.learning_rate = self.base_learning_rate * self.total_train_batch_size / self.lr_scaling_batch_size

    @property
    def total_train_batch_size(self) -> int:
        """Images per optimizer step over all processes."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.world_size


@dataclass
class MTOTrainingArguments(ScaledLRTrainingArguments):
    """`TrainingArguments` for masked image modeling with MTO.

    Defaults follow the official MAE pre-training recipe (AdamW betas (0.9, 0.95), lr = base lr x total batch / 256,
    weight decay 0.05) and keep image columns (`remove_unused_columns=False`).
    """

    mto_spa_weight: float = field(
        default=0.003, metadata={"help": "Weight of the sparsity loss L_spa (MTO Eq. 3). 0 disables it."}
    )
    mto_e_weight: float = field(
        default=0.003,
        metadata={"help": "Weight of the singularity loss L_e = 1/(H^0+eps) (MTO Eq. 6). 0 disables it."},
    )
    mto_r_weight: float = field(
        default=0.003, metadata={"help": "Weight of the ranking loss L_r (MTO Eq. 7). 0 disables it."}
    )
    masking: str | None = field(
        default=None,
        metadata={
            "help": f"Mask generator, one of {TRAINER_MASKING}. Default: the method's `default_masking` (MAE: "
            "random, SimMIM: simmim_block). The ratio is the model config's mask_ratio. `evolved` is evolved "
            "hierarchical masking, cut from a tree built from the model's own attention at a depth that rises with the "
            "training progress t (see evolved_f0)."
        },
    )
    mask_patch_size: int = field(
        default=32, metadata={"help": "Side in pixels of SimMIM's mask squares (simmim_block masking)."}
    )
    evolved_attention_layers: int | None = field(
        default=None,
        metadata={
            "help": "Evolved masking: how many of the first encoder blocks' attention defines the patch similarity. "
            "Default: half the encoder depth (the EHM paper uses 6 of 12)."
        },
    )
    evolved_f0: float = field(
        default=0.0,
        metadata={
            "help": "Evolved masking: depth = floor(height x (f0 + (f1 - f0) x t)), t the training progress in [0, 1) "
            "(fractional epoch / total epochs, counted in optimizer steps: global_step / max_steps)."
        },
    )
    evolved_f1: float = field(default=1.0, metadata={"help": "Evolved masking: see evolved_f0."})
    reconstruction_images: int = field(
        default=8,
        metadata={
            "help": "At every evaluation, the recipe writes original / masked / reconstruction pictures of this many "
            "validation images to output_dir/reconstructions (and TensorBoard). 0 disables them."
        },
    )
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2 (MAE uses 0.95)."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (MAE uses 0.05)."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep dataset columns: the image transform needs the image column."}
    )

    def __post_init__(self):
        for name in ("mto_spa_weight", "mto_e_weight", "mto_r_weight"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.masking is not None and self.masking not in TRAINER_MASKING:
            raise ValueError(f"masking must be one of {TRAINER_MASKING}, got {self.masking!r}")
        if not 0.0 <= self.evolved_f0 <= self.evolved_f1 <= 1.0:
            raise ValueError(
                f"evolved masking needs 0 <= evolved_f0 <= evolved_f1 <= 1, got {self.evolved_f0}, {self.evolved_f1}"
            )
        if self.evolved_attention_layers is not None and self.evolved_attention_layers < 1:
            raise ValueError(f"evolved_attention_layers must be >= 1, got {self.evolved_attention_layers}")
        if self.reconstruction_images < 0:
            raise ValueError(f"reconstruction_images must be >= 0, got {self.reconstruction_images}")
        super().__post_init__()

    @property
    def use_mto(self) -> bool:
        """Whether any MTO term has a non-zero weight (otherwise the MTO work is skipped entirely)."""
        return any(w > 0 for w in (self.mto_spa_weight, self.mto_e_weight, self.mto_r_weight))

    def mto_weights(self) -> dict[str, float]:
        return {
            "sparsity_loss": self.mto_spa_weight,
            "singularity_loss": self.mto_e_weight,
            "ranking_loss": self.mto_r_weight,
        }


__all__ = ["MTOTrainingArguments", "ScaledLRTrainingArguments", "TRAINER_MASKING"]
