"""Fine-tuning a pre-trained ViT encoder for image classification the way the official MAE recipe does, on the HF
Trainer: the pieces `recipes/finetune.py` puts together.

* **Layer-wise lr decay** (`layer_decay_param_groups`, `FinetuneTrainer.create_optimizer`): timm's
  `param_groups_layer_decay` with a group matcher for transformers' ViT parameter names -- the embeddings are layer 0,
  block i is layer i + 1, everything after the blocks (final norm, `fc_norm`, classifier) is layer L + 1 -- so
  parameter p of layer l trains at lr x layer_decay^(L + 1 - l), as in MAE and BEiT. No weight decay on biases,
  norms, the CLS token and the position embeddings.
* **Mixup / CutMix** (`build_mixup`, `FinetuneTrainer.compute_loss`): timm's `Mixup` applied to each training batch
  on the device, inside the training step, with timm's `SoftTargetCrossEntropy`; label smoothing is then Mixup's
  (`--label_smoothing_factor`). Without mixup, `--label_smoothing_factor` goes to the Trainer's own label smoother.
* **RandAugment and random erasing** (`build_train_transform`): timm's `create_transform` with MAE's settings
  (`rand-m9-mstd0.5-inc1`, bicubic, `reprob` 0.25 in pixel mode).
* **Global average pooling** (`--global_pool`): `ViTGAPForImageClassification` (`hf_mto.models.vit_gap`),
  `classifier(fc_norm(mean of the patch tokens))` as MAE. It saves as model type `vit_gap` (loads with
  `import hf_mto`, or with `trust_remote_code=True` where hf_mto is not installed). Without it the model
  is transformers' own `ViTForImageClassification` (CLS token) and saves as a plain `vit` checkpoint.
* **Stochastic depth** (`apply_drop_path`): transformers' `ViTLayer` has no drop path, but it applies one dropout
  module (`layer.dropout`) to the output of each residual branch (attention, MLP) right before the residual
  addition; `apply_drop_path` makes that module `Sequential(the dropout, timm DropPath(rate_i))`, with rates rising
  linearly over depth from 0 to `drop_path_rate` (timm/MAE). No parameter is added, so the state dict and the saved
  checkpoint are unchanged (a saved model has no drop path; it is a training-time regulariser).
* **Partial fine-tuning** (`--trainable_blocks N`, `freeze_for_partial_finetuning`): MAE's protocol of section 4.3
  -- only the last N blocks, the norms after them and the classifier train; the embeddings and earlier blocks are
  frozen and left out of the optimizer.
* **Accuracy** (`AccuracyMetric`): `compute_metrics` through `evaluate`, with the accuracy module shipped in
  `hf_mto.metrics` (the `evaluate` wheel has no metric scripts and `evaluate.load("accuracy")` needs the Hub).
"""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import datasets
import evaluate
import numpy as np
import torch
from PIL import Image, ImageOps
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torchvision import transforms as T
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    PreTrainedConfig,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.vit.modeling_vit import ViTLayer

from .checkpoints import (
    ConvertedCheckpointsMixin,
    IncompleteCheckpointError,
    check_loading_info,
    newly_initialised_keys,
)
from .data import build_image_processor, to_rgb
from .export import export_encoder
from .methods import method_for, model_types, registered_methods
from .metrics import ACCURACY_PATH
from .models.vit_gap import ViTGAPConfig, ViTGAPForImageClassification
from .training_args import ScaledLRTrainingArguments

logger = logging.getLogger(__name__)

MIXUP_MODES = ("batch", "pair", "elem")
RANDOM_ERASING_MODES = ("const", "rand", "pixel")
# Weights that never get weight decay (besides every 1-D parameter: biases, norms).
NO_WEIGHT_DECAY = ("*cls_token", "*position_embeddings", "*mask_token")
# Pre-training checkpoints whose encoder is exported (hf_mto.export) before fine-tuning.
_CLASSIFIER_TYPES = ("vit", ViTGAPConfig.model_type)


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class FinetuneArguments:
    """The checkpoint to fine-tune, the classifier built on it and the training augmentation."""

    model_name_or_path: str = field(
        metadata={
            "help": "Local folder or Hub id of the checkpoint to fine-tune: an exported encoder "
            "(recipes/export_encoder.py, model_type vit), any transformers ViT (vit / vit_gap), or one of our "
            "pre-training checkpoints (vit_mae_mto / simmim_mto, whose encoder is exported on the fly)."
        }
    )
    global_pool: bool = field(
        default=False,
        metadata={
            "help": "Classify fc_norm(mean of the patch tokens) as MAE's fine-tuning (saves as model_type vit_gap, "
            "which needs hf_mto or trust_remote_code to load). Default: the CLS token, transformers' own "
            "ViTForImageClassification (saves as a plain vit checkpoint)."
        },
    )
    drop_path_rate: float = field(
        default=0.1, metadata={"help": "Stochastic depth: rate of the last block, linear from 0 over depth."}
    )
    head_init_std: float | None = field(
        default=2e-5,
        metadata={"help": "Std of the truncated-normal init of a new classifier (MAE: 2e-5). null: transformers'."},
    )
    crop_min_scale: float = field(
        default=0.08,
        metadata={"help": "Random resized crop: smallest fraction of the image area kept (timm's and MAE's 0.08)."},
    )
    auto_augment: str | None = field(
        default="rand-m9-mstd0.5-inc1",
        metadata={"help": "timm auto-augment policy (RandAugment magnitude 9, std 0.5). null or '' disables it."},
    )
    color_jitter: float | None = field(
        default=None, metadata={"help": "Colour jitter strength (timm applies it only without auto_augment)."}
    )
    reprob: float = field(default=0.25, metadata={"help": "Random erasing probability (MAE: 0.25)."})
    remode: str = field(default="pixel", metadata={"help": f"Random erasing mode, one of {RANDOM_ERASING_MODES}."})
    recount: int = field(default=1, metadata={"help": "Random erasing count."})
    eval_crop_pct: float = field(
        default=0.875,
        metadata={
            "help": "Evaluation: resize to size / crop_pct, then centre-crop (224 -> 256 -> 224). 1.0: no crop."
        },
    )
    trainable_blocks: int | None = field(
        default=None,
        metadata={
            "help": "Partial fine-tuning (MAE, section 4.3, Fig. 9): train only the last N encoder blocks, the norms "
            "after them and the classifier; the embeddings and the earlier blocks stay frozen (0: the classifier "
            "alone, on the frozen encoder's norm). null, or the encoder's depth: full fine-tuning."
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads are cached."})
    model_revision: str | None = field(default=None, metadata={"help": "Hub revision of --model_name_or_path."})

    def __post_init__(self):
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.head_init_std is not None and not self.head_init_std > 0:
            raise ValueError(f"head_init_std must be > 0 (or null), got {self.head_init_std}")
        if not 0.0 < self.crop_min_scale <= 1.0:
            raise ValueError(f"crop_min_scale must be in (0, 1], got {self.crop_min_scale}")
        if not 0.0 <= self.reprob <= 1.0:
            raise ValueError(f"reprob must be in [0, 1], got {self.reprob}")
        if self.remode not in RANDOM_ERASING_MODES:
            raise ValueError(f"remode must be one of {RANDOM_ERASING_MODES}, got {self.remode!r}")
        if self.recount < 1:
            raise ValueError(f"recount must be >= 1, got {self.recount}")
        if self.trainable_blocks is not None and self.trainable_blocks < 0:
            raise ValueError(f"trainable_blocks must be >= 0 (or null), got {self.trainable_blocks}")
        if not 0.0 < self.eval_crop_pct <= 1.0:
            raise ValueError(f"eval_crop_pct must be in (0, 1], got {self.eval_crop_pct}")
        if self.auto_augment == "":
            self.auto_augment = None

    @property
    def hub_kwargs(self) -> dict:
        kwargs = {"cache_dir": self.cache_dir, "revision": self.model_revision}
        return {key: value for key, value in kwargs.items() if value is not None}


@dataclass
class FinetuneTrainingArguments(ScaledLRTrainingArguments):
    """`TrainingArguments` plus MAE's fine-tuning optimisation: base lr scaled by the batch, layer-wise lr decay, Mixup
    / CutMix. Defaults are the official MAE fine-tuning recipe's (AdamW (0.9, 0.999), weight decay 0.05, label
    smoothing 0.1, layer decay 0.75, blr 1e-3), with Mixup / CutMix off unless asked for."""

    base_learning_rate: float | None = field(
        default=1e-3,
        metadata={
            "help": "Base learning rate: learning_rate = base_learning_rate x total batch / lr_scaling_batch_size "
            "(total batch = per-device batch x gradient accumulation x processes), as in MAE. null: use "
            "--learning_rate as given."
        },
    )
    layer_decay: float | None = field(
        default=0.75,
        metadata={
            "help": "Layer-wise lr decay: a parameter of layer l (embeddings 0, block i -> i + 1, head L + 1) trains "
            "at lr x layer_decay^(L + 1 - l). null or 1.0: one lr for all."
        },
    )
    mixup: float = field(default=0.0, metadata={"help": "Mixup alpha; > 0 enables Mixup (MAE: 0.8)."})
    cutmix: float = field(default=0.0, metadata={"help": "CutMix alpha; > 0 enables CutMix (MAE: 1.0)."})
    cutmix_minmax: list[float] | None = field(
        default=None, metadata={"help": "CutMix min/max box ratio; overrides cutmix alpha when set."}
    )
    mixup_prob: float = field(default=1.0, metadata={"help": "Probability of applying Mixup or CutMix to a batch."})
    mixup_switch_prob: float = field(
        default=0.5, metadata={"help": "Probability of CutMix instead of Mixup when both are enabled."}
    )
    mixup_mode: str = field(default="batch", metadata={"help": f"How mixing parameters are drawn: {MIXUP_MODES}."})
    label_smoothing_factor: float = field(
        default=0.1, metadata={"help": "Label smoothing (MAE: 0.1); Mixup's when Mixup/CutMix is on."}
    )
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (MAE: 0.05)."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep dataset columns: the image transform needs the image column."}
    )

    def __post_init__(self):
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1] (or null), got {self.layer_decay}")
        for name in ("mixup", "cutmix"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} alpha must be >= 0, got {getattr(self, name)}")
        if self.cutmix_minmax is not None and (
            len(self.cutmix_minmax) != 2 or not 0.0 < self.cutmix_minmax[0] < self.cutmix_minmax[1] <= 1.0
        ):
            raise ValueError(f"cutmix_minmax must be two ratios 0 < min < max <= 1, got {self.cutmix_minmax}")
        for name in ("mixup_prob", "mixup_switch_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.mixup_mode not in MIXUP_MODES:
            raise ValueError(f"mixup_mode must be one of {MIXUP_MODES}, got {self.mixup_mode!r}")
        if not 0.0 <= self.label_smoothing_factor < 1.0:
            raise ValueError(f"label_smoothing_factor must be in [0, 1), got {self.label_smoothing_factor}")
        if self.use_mixup and self.per_device_train_batch_size % 2:
            raise ValueError(
                f"Mixup/CutMix mixes each batch with itself reversed and needs an even per_device_train_batch_size, "
                f"got {self.per_device_train_batch_size}"
            )
        super().__post_init__()

    @property
    def use_mixup(self) -> bool:
        return self.mixup_prob > 0 and (self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None)


# ----------------------------------------------------------------------------------------------------------------
# Layer-wise lr decay
# ----------------------------------------------------------------------------------------------------------------

# transformers 5.x names the blocks `vit.layers.<i>`, 4.x `vit.encoder.layer.<i>`.
_BLOCK = re.compile(r"(?:^|\.)(?:layers|encoder\.layer)\.(\d+)\.")
_EMBEDDINGS = re.compile(r"(?:^|\.)embeddings\.")


def vit_layer_id(name: str, num_layers: int) -> int:
    """Layer of a ViT parameter for layer-wise lr decay: embeddings 0, block i -> i + 1, the rest num_layers + 1."""
    if _EMBEDDINGS.search(name):
        return 0
    block = _BLOCK.search(name)
    return int(block.group(1)) + 1 if block else num_layers + 1


class _GroupedParameters:
    """What timm's `param_groups_layer_decay` reads from a model -- `named_parameters()` and `group_matcher()` --
    for a transformers ViT, which has no `group_matcher` of its own."""

    def __init__(self, model: nn.Module):
        self.model = model
        blocks = [int(m.group(1)) for name, _ in model.named_parameters() if (m := _BLOCK.search(name))]
        self.num_layers = max(blocks) + 1 if blocks else 0

    def named_parameters(self, *args, **kwargs):
        return self.model.named_parameters(*args, **kwargs)

    def group_matcher(self, coarse: bool = False) -> Callable[[str], int]:
        return lambda name: vit_layer_id(name, self.num_layers)


def layer_decay_param_groups(
    model: nn.Module, weight_decay: float, layer_decay: float, no_weight_decay: Sequence[str] = NO_WEIGHT_DECAY
) -> list[dict]:
    """Optimizer parameter groups with layer-wise lr decay (timm's `param_groups_layer_decay`).

    Each group has `params`, `weight_decay` (0 for 1-D parameters and the `no_weight_decay` patterns) and
    `lr_scale` = layer_decay^(L + 1 - layer) with layers as `vit_layer_id`. Sorted by decreasing `lr_scale`, so the
    first group (whose lr the Trainer logs) is the head's, at the peak learning rate.
    """
    from timm.optim._param_groups import param_groups_layer_decay

    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    view = _GroupedParameters(model)
    if view.num_layers == 0:
        raise ValueError(
            f"layer decay needs a ViT (parameters named '...layers.<i>.'); {type(model).__name__} has none"
        )
    groups = param_groups_layer_decay(
        view, weight_decay=weight_decay, no_weight_decay_list=tuple(no_weight_decay), layer_decay=layer_decay
    )
    return sorted(groups, key=lambda group: -group["lr_scale"])


# ----------------------------------------------------------------------------------------------------------------
# Partial fine-tuning
# ----------------------------------------------------------------------------------------------------------------

# BEiT's relative position bias shared by every block (`use_shared_relative_position_bias`, on in BEiT and ConMIM
# pre-training) sits outside the blocks; left trainable it would change what the frozen blocks compute.
_SHARED_POSITION_BIAS = re.compile(r"(?:^|\.)shared_position_bias\.")


def freeze_for_partial_finetuning(model: nn.Module, trainable_blocks: int) -> list[str]:
    """Partial fine-tuning (MAE, section 4.3): freeze the embeddings and every encoder block but the last
    `trainable_blocks` (layers as `vit_layer_id`: the embeddings count with the first block, so that all blocks
    trainable is full fine-tuning), and BEiT's shared relative position bias with them; the norms after the blocks
    and the classifier stay trainable. The optimizer (layer decay's groups and the Trainer's own) then leaves the
    frozen parameters out.

    Args:
        model: a ViT classifier (transformers' ViT or BEiT one, or `ViTGAPForImageClassification`).
        trainable_blocks: how many of the last encoder blocks train, in [0, number of blocks].

    Returns:
        The names of the frozen parameters.

    Raises:
        ValueError: a model without ViT blocks, or `trainable_blocks` outside [0, its number of blocks].
    """
    num_layers = _GroupedParameters(model).num_layers
    if num_layers == 0:
        raise ValueError(
            f"partial fine-tuning needs a ViT (parameters named '...layers.<i>.'); {type(model).__name__} has none"
        )
    if not 0 <= trainable_blocks <= num_layers:
        raise ValueError(
            f"trainable_blocks must be in [0, {num_layers}] (the blocks of this {type(model).__name__}), "
            f"got {trainable_blocks}"
        )
    if trainable_blocks == num_layers:
        return []
    frozen = []
    for name, param in model.named_parameters():
        if vit_layer_id(name, num_layers) <= num_layers - trainable_blocks or _SHARED_POSITION_BIAS.search(name):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


# ----------------------------------------------------------------------------------------------------------------
# Stochastic depth
# ----------------------------------------------------------------------------------------------------------------


def apply_drop_path(model: nn.Module, drop_path_rate: float) -> list[float]:
    """Add stochastic depth to every `ViTLayer` of `model`; returns the rate of each block.

    Block i of L drops its residual branches with probability `drop_path_rate * i / (L - 1)` (timm's linear rule).
    `ViTLayer` runs its one dropout module on each branch's output right before the residual addition; that module
    becomes `Sequential(dropout, DropPath(rate))`, so a dropped branch adds nothing and a kept one is scaled by
    1 / (1 - rate), per sample, in training mode only. No parameters are added: state dicts are unchanged.
    """
    from timm.layers import DropPath

    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
    layers = [module for module in model.modules() if isinstance(module, ViTLayer)]
    if not layers:
        raise ValueError(f"apply_drop_path found no transformers ViTLayer in {type(model).__name__}")
    rates = [drop_path_rate * index / max(len(layers) - 1, 1) for index in range(len(layers))]
    for layer, rate in zip(layers, rates, strict=True):
        if any(isinstance(module, DropPath) for module in layer.modules()):
            raise ValueError("apply_drop_path was already applied to this model")
        if not isinstance(getattr(layer, "dropout", None), nn.Dropout):
            raise RuntimeError(
                "transformers' ViTLayer no longer has the residual-branch `dropout` module that apply_drop_path wraps"
            )
        if rate > 0:
            layer.dropout = nn.Sequential(layer.dropout, DropPath(rate))
    return rates


# ----------------------------------------------------------------------------------------------------------------
# Mixup / CutMix
# ----------------------------------------------------------------------------------------------------------------


def build_mixup(args: TrainingArguments, num_classes: int):
    """timm `Mixup` from `FinetuneTrainingArguments`, or None when Mixup and CutMix are off (or `args` has no such
    fields, e.g. plain `TrainingArguments`)."""
    if not getattr(args, "use_mixup", False):
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=args.mixup,
        cutmix_alpha=args.cutmix,
        cutmix_minmax=args.cutmix_minmax,
        prob=args.mixup_prob,
        switch_prob=args.mixup_switch_prob,
        mode=args.mixup_mode,
        label_smoothing=args.label_smoothing_factor,
        num_classes=num_classes,
    )


# ----------------------------------------------------------------------------------------------------------------
# Data: labels and transforms
# ----------------------------------------------------------------------------------------------------------------


def prepare_labels(splits: datasets.DatasetDict) -> list[str]:
    """Class names of the "label" column of `splits` (from `hf_mto.data.load_datasets`), made a `ClassLabel` in every
    split if it is not one already (integers 0..C-1 or strings). Call before setting transforms.

    Raises:
        ValueError: no label column, labels that are neither class labels, integers >= 0 nor strings, validation
            classes the training split lacks, or fewer than two classes.
    """
    train = splits["train"]
    if "label" not in train.column_names:
        raise ValueError(
            f"fine-tuning needs labels, but the training data has no label column (columns: {train.column_names}); "
            "name it with --label_column_name"
        )
    feature = train.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
    elif isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")):
        values = [value for split in splits.values() for value in split["label"]]
        if min(values) < 0:
            raise ValueError(f"integer labels must be class indices >= 0, found {min(values)}")
        names = [str(index) for index in range(max(values) + 1)]
    elif isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        names = sorted(set(train["label"]))
    else:
        raise ValueError(f"the label column must hold class labels, integers or strings, not {feature}")
    if len(names) < 2:
        raise ValueError(f"fine-tuning a classifier needs at least 2 classes, found {names}")
    class_label = datasets.ClassLabel(names=names)
    for name in list(splits):
        split_feature = splits[name].features["label"]
        if isinstance(split_feature, datasets.ClassLabel):
            if list(split_feature.names) != names:
                raise ValueError(
                    f"the {name} split's classes {split_feature.names} differ from the training split's {names}"
                )
            continue
        if isinstance(split_feature, datasets.Value) and split_feature.dtype in ("string", "large_string"):
            unknown = sorted(set(splits[name]["label"]) - set(names))
            if unknown:
                raise ValueError(f"the {name} split has classes the training split lacks: {unknown[:10]}")
        splits[name] = splits[name].cast_column("label", class_label)
    return names


def build_train_transform(
    image_size: int | Sequence[int], image_mean: Sequence[float], image_std: Sequence[float], args: FinetuneArguments
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> normalised [3, H, W] tensor with MAE's fine-tuning augmentation: timm's `create_transform`
    (random resized crop keeping `args.crop_min_scale` to all of the area, flip, RandAugment `args.auto_augment`,
    bicubic interpolation, random erasing `args.reprob`)."""
    from timm.data import create_transform

    size = image_size if isinstance(image_size, int) else tuple(image_size)
    try:
        transform = create_transform(
            input_size=size,
            is_training=True,
            scale=(args.crop_min_scale, 1.0),
            color_jitter=args.color_jitter,
            auto_augment=args.auto_augment,
            interpolation="bicubic",
            re_prob=args.reprob,
            re_mode=args.remode,
            re_count=args.recount,
            mean=tuple(image_mean),
            std=tuple(image_std),
        )
    except (AssertionError, KeyError, ValueError) as err:
        raise ValueError(f"auto_augment {args.auto_augment!r} is not a valid timm policy string: {err!r}") from err
    _fix_posterize(transform)
    return T.Compose([T.Lambda(to_rgb), transform])


def posterize(image: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize op, also for 0 bits: keeps the `bits_to_keep` most significant bits of each channel.

    timm's "PosterizeIncreasing" (RandAugment's `inc1` policies, MAE's `rand-m9-mstd0.5-inc1`) asks for 0 bits at
    magnitude 10, which the magnitude noise reaches for ~2 % of its draws. Older Pillow returned a black image for
    that; the Pillow pinned here (13.0) raises ValueError in `ImageOps.posterize`, which would stop the training
    run. 0 bits gives the black image again here.
    """
    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return image.point([0] * 256 * len(image.getbands()))
    return ImageOps.posterize(image, bits_to_keep)


def _fix_posterize(transform) -> None:
    """Point the posterize ops of timm's auto-augment policies inside `transform` at `posterize`."""
    from timm.data import auto_augment

    for step in getattr(transform, "transforms", []):
        for op in getattr(step, "ops", []):
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = posterize


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------

_CONFIG_KEYS_NOT_COPIED = ("model_type", "architectures", "auto_map", "transformers_version", "id2label", "label2id")


def _head_keys(global_pool: bool) -> set[str]:
    keys = {"classifier.weight", "classifier.bias"}
    return keys | {"fc_norm.weight", "fc_norm.bias"} if global_pool else keys


def _is_pretraining_checkpoint(config_dict: dict) -> bool:
    """Whether a checkpoint is a pre-training model a method declares (ours, or an upstream one such as an official
    MAE): its encoder is exported first."""
    try:
        method_for(config_dict)
    except ValueError:
        return False
    return True


def build_classification_model(args: FinetuneArguments, label_names: Sequence[str]) -> PreTrainedModel:
    """A ViT classifier for `label_names`, its encoder loaded from `args.model_name_or_path`.

    The classifier is `ViTGAPForImageClassification` with `args.global_pool`, else `ViTForImageClassification`; the
    encoder comes from an exported / plain ViT checkpoint (model_type vit or vit_gap) or from the encoder of one of our
    pre-training checkpoints (exported first to a temporary folder). Only the head (classifier, and `fc_norm` with
    GAP) may be missing from the checkpoint or have another shape; it is initialised truncated-normal with std
    `args.head_init_std` (MAE's 2e-5). Drop path at `args.drop_path_rate` is then added (`apply_drop_path`), and
    with `args.trainable_blocks` all but the last blocks are frozen (`freeze_for_partial_finetuning`).

    Raises:
        ValueError: a checkpoint of another model type, or one that lacks encoder weights.
    """
    source, hub_kwargs = args.model_name_or_path, args.hub_kwargs
    try:
        config_dict, _ = PreTrainedConfig.get_config_dict(source, **hub_kwargs)
    except OSError as err:
        raise FileNotFoundError(
            f"cannot read the checkpoint {source!r} ({err}). Pre-train and export one first "
            "(recipes/pretrain.py, then recipes/export_encoder.py) or pass a ViT checkpoint's Hub id."
        ) from err
    model_type = config_dict.get("model_type")
    model_class, config_class = (
        (ViTGAPForImageClassification, ViTGAPConfig) if args.global_pool else (ViTForImageClassification, ViTConfig)
    )
    with contextlib.ExitStack() as stack:
        if _is_pretraining_checkpoint(config_dict):
            exported = stack.enter_context(tempfile.TemporaryDirectory(prefix="hf_mto_encoder_"))
            export_encoder(source, exported, **hub_kwargs)
            source, hub_kwargs = exported, {}
            config_dict, _ = PreTrainedConfig.get_config_dict(source)
        elif model_type not in _CLASSIFIER_TYPES + _stock_encoder_types():
            raise ValueError(
                f"fine-tuning needs a ViT checkpoint (model_type "
                f"{_CLASSIFIER_TYPES + _stock_encoder_types() + tuple(model_types())}); "
                f"{source!r} has model_type {model_type!r}"
            )
        kept = {key: value for key, value in config_dict.items() if key not in _CONFIG_KEYS_NOT_COPIED}
        own_classifier = config_dict.get("model_type") not in _CLASSIFIER_TYPES
        if own_classifier:  # another stock encoder a method exports (BEiT's): transformers' classifier of its family
            model_class, config_class = _stock_classifier(config_dict, args)
            kept["drop_path_rate"] = args.drop_path_rate  # its own stochastic depth, not `apply_drop_path`'s
        kept.update(
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={name: index for index, name in enumerate(label_names)},
            finetuning_task="image-classification",
        )
        config = config_class.from_dict(kept)
        model, info = model_class.from_pretrained(
            source, config=config, ignore_mismatched_sizes=True, output_loading_info=True, **hub_kwargs
        )
    head = _head_keys(args.global_pool)
    try:
        check_loading_info(info, args.model_name_or_path, model_class.__name__, allowed_new=head)
    except IncompleteCheckpointError as err:
        if model_type != ViTGAPConfig.model_type:
            raise
        raise IncompleteCheckpointError(f"{err} A vit_gap checkpoint needs --global_pool.", err.keys) from None
    new_head = set(newly_initialised_keys(info)) & {"classifier.weight"}
    if new_head and args.head_init_std is not None:
        with torch.no_grad():
            nn.init.trunc_normal_(model.classifier.weight, std=args.head_init_std)
            nn.init.zeros_(model.classifier.bias)
    if args.drop_path_rate > 0 and not own_classifier:
        apply_drop_path(model, args.drop_path_rate)
    if args.trainable_blocks is not None:
        freeze_for_partial_finetuning(model, args.trainable_blocks)
    return model


def _stock_encoder_types() -> tuple[str, ...]:
    """The model types of the stock encoders the methods export to, beyond ViT's (BEiT's `beit`)."""
    types = {method.stock_encoder_class.config_class.model_type for method in registered_methods()}
    return tuple(sorted(types - set(_CLASSIFIER_TYPES)))


def _stock_classifier(config_dict: dict, args: FinetuneArguments) -> tuple[type[PreTrainedModel], type]:
    """transformers' image classifier and config for an exported encoder of another family (`beit`: BEiT's and
    ConMIM's). It pools as the export's config says: the mean of the patch tokens under its pooler's LayerNorm
    (`use_mean_pooling`, BEiT's fine-tuning: `--global_pool true`) or the CLS token (`--global_pool false`)."""
    model_type = config_dict.get("model_type")
    pools_mean = bool(config_dict.get("use_mean_pooling", True))
    if args.global_pool != pools_mean:
        pooling = "mean-pools the patch tokens" if pools_mean else "takes the CLS token"
        raise ValueError(
            f"this {model_type!r} encoder's classifier {pooling} (use_mean_pooling={pools_mean} in its config): pass "
            f"--global_pool {str(pools_mean).lower()}"
        )
    config_class = CONFIG_MAPPING[model_type]
    return AutoModelForImageClassification._model_mapping[config_class], config_class


def load_image_processor(args: FinetuneArguments, config) -> ViTImageProcessor:
    """The checkpoint's image processor (else resize + ImageNet normalisation), sized to the model's input."""
    try:
        processor = AutoImageProcessor.from_pretrained(args.model_name_or_path, **args.hub_kwargs)
    except (OSError, ValueError):
        processor = build_image_processor(config)
    height, width = (config.image_size,) * 2 if isinstance(config.image_size, int) else config.image_size
    if isinstance(getattr(processor, "size", None), dict) and "height" in processor.size:
        processor.size = {"height": height, "width": width}
    return processor


# ----------------------------------------------------------------------------------------------------------------
# Metric and Trainer
# ----------------------------------------------------------------------------------------------------------------


def argmax_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`preprocess_logits_for_metrics`: keep the predicted class only (the Trainer then gathers [N], not [N, C])."""
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits.argmax(dim=-1)


class AccuracyMetric:
    """`compute_metrics` for the Trainer: top-1 accuracy through `evaluate` (the module shipped in
    `hf_mto.metrics`, which loads offline). Takes class predictions or logits."""

    def __init__(self, path: str = ACCURACY_PATH):
        self.metric = evaluate.load(path)

    def __call__(self, eval_prediction) -> dict[str, float]:
        predictions = np.asarray(eval_prediction.predictions)
        if predictions.ndim > 1:
            predictions = predictions.argmax(axis=-1)
        return self.metric.compute(predictions=predictions, references=np.asarray(eval_prediction.label_ids))


class FinetuneTrainer(ConvertedCheckpointsMixin, Trainer):
    """The HF Trainer with layer-wise lr decay and Mixup / CutMix (see the module docstring).

    With plain `TrainingArguments` it is the stock Trainer. Losses are per-batch means, divided by the Trainer over
    gradient-accumulation steps (`loss_is_scaled_for_ga = False`), with and without Mixup alike.
    """

    loss_is_scaled_for_ga = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        model = self.accelerator.unwrap_model(self.model) if self.model is not None else None
        num_labels = getattr(getattr(model, "config", None), "num_labels", 0)
        self.mixup = build_mixup(self.args, num_labels)
        self.soft_target_loss = SoftTargetCrossEntropy()
        self._warned_odd_batch = False

    def create_optimizer(self, model=None):
        layer_decay = getattr(self.args, "layer_decay", None)
        if self.optimizer is not None or layer_decay is None or layer_decay == 1.0:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        groups = layer_decay_param_groups(opt_model, self.args.weight_decay, layer_decay)
        for group in groups:
            group["lr"] = self.args.learning_rate * group["lr_scale"]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        unsupported = {"params", "model", "optimizer_dict"} & set(optimizer_kwargs)
        if unsupported:
            raise ValueError(f"layer_decay does not work with optim={self.args.optim!r}: set --layer_decay null")
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Per-batch means everywhere (see the class docstring), so `num_items_in_batch` is not passed on.
        if self.mixup is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs)
        pixel_values, labels = inputs["pixel_values"], inputs["labels"]
        if pixel_values.shape[0] % 2:
            # Mixup pairs each image with the batch reversed. A last partial batch (or dropped unreadable images)
            # can leave an odd count: the last image sits this step out.
            if not self._warned_odd_batch:
                self._warned_odd_batch = True
                logger.warning(
                    "Mixup/CutMix needs an even batch; dropping the last image of odd batches (set "
                    "--dataloader_drop_last to avoid a partial last batch)"
                )
            if pixel_values.shape[0] == 1:
                return super().compute_loss(model, inputs, return_outputs=return_outputs)
            pixel_values, labels = pixel_values[:-1], labels[:-1]
        pixel_values, targets = self.mixup(pixel_values, labels)
        outputs = model(pixel_values=pixel_values)
        loss = self.soft_target_loss(outputs.logits.float(), targets)
        return (loss, outputs) if return_outputs else loss


__all__ = [
    "AccuracyMetric",
    "FinetuneArguments",
    "FinetuneTrainer",
    "FinetuneTrainingArguments",
    "apply_drop_path",
    "argmax_logits",
    "build_classification_model",
    "build_mixup",
    "build_train_transform",
    "freeze_for_partial_finetuning",
    "layer_decay_param_groups",
    "load_image_processor",
    "prepare_labels",
    "vit_layer_id",
]
