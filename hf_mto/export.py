"""Export the encoder of a pre-trained hf_mto model as a plain transformers ViT checkpoint.

`export_encoder(checkpoint_or_model, output_dir)` turns a [`ViTMAEMTOForPreTraining`] or
[`SimMIMMTOForMaskedImageModeling`] (a checkpoint path, a Hub id or a model instance) into a directory that any
transformers install loads with no remote code and without hf_mto:

- `config.json`: a [`~transformers.ViTConfig`] (`model_type: "vit"`) with the encoder's sizes, no `auto_map` and no
  MTO, masking or decoder field;
- `model.safetensors`: the weights of a [`~transformers.ViTModel`] without pooling layer, every key filled from the
  pre-trained encoder (the SimMIM mask token and the MAE decoder are dropped). Neither pre-training has a pooler, so
  load features with `ViTModel.from_pretrained(path, add_pooling_layer=False)`; `AutoModelForImageClassification`
  uses the CLS token and needs none;
- `preprocessor_config.json`: the checkpoint's image processor, or a [`~transformers.ViTImageProcessor`] at the model's
  size with ImageNet mean/std when there is none;
- `README.md`: a short model card.

```python
>>> from transformers import AutoModelForImageClassification
>>> from hf_mto.export import export_encoder

>>> path = export_encoder("outputs/vit-mae-mto-tiny", "outputs/vit-mae-mto-tiny-encoder")
>>> model = AutoModelForImageClassification.from_pretrained(path, num_labels=10, ignore_mismatched_sizes=True)
```

Two decisions, also written into the model card:

- MAE's position embeddings are a fixed (frozen) 2-D sin-cos table. ViT has no frozen variant: after export they are
  ordinary, trainable ViT position embeddings holding the same values, so fine-tuning updates them (as the official
  MAE fine-tuning recipe does). Freeze `vit.embeddings.position_embeddings` to keep them fixed.
- `ViTMAEConfig` has no `encoder_stride` (only SimMIM's head uses it); the exported MAE config sets it to `patch_size`,
  SimMIM's keeps its own (which equals `patch_size`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import (
    AutoImageProcessor,
    PreTrainedConfig,
    PreTrainedModel,
    ViTConfig,
    ViTImageProcessor,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.utils import cached_file

from .checkpoints import check_loading_info, newly_initialised_keys
from .methods import PreTrainingMethod, method_for, model_types

# The ViTConfig fields carried over from the pre-training config (every one of them shapes or runs the encoder).
ENCODER_CONFIG_FIELDS = (
    "image_size",
    "patch_size",
    "num_channels",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "layer_norm_eps",
    "qkv_bias",
    "initializer_range",
)


def _method(target, source: str) -> type[PreTrainingMethod]:
    """The method of `target` (see `method_for`), or a ValueError naming its model type and what exports."""
    try:
        return method_for(target)
    except ValueError:
        model_type = target.get("model_type") if isinstance(target, dict) else getattr(target, "model_type", None)
        raise _not_ours(model_type, source) from None


def _not_ours(model_type, source: str) -> ValueError:
    supported = " or ".join(repr(name) for name in model_types())
    return ValueError(
        f"export_encoder exports hf_mto pre-training models (model_type {supported}); {source} has model_type "
        f"{model_type!r}. A plain transformers checkpoint (e.g. model_type 'vit') needs no export."
    )


def _as_int(value) -> int:
    return int(value[0]) if isinstance(value, (list, tuple)) else int(value)


def encoder_config(config: PreTrainedConfig) -> ViTConfig:
    """The [`~transformers.ViTConfig`] of the encoder of a pre-training config (one a method declares).

    Only the encoder's fields are carried (see `ENCODER_CONFIG_FIELDS`); `encoder_stride` is the config's own, or
    `patch_size` where it has none (MAE).
    """
    _method(config, f"config {type(config).__name__}")
    kwargs = {field: getattr(config, field) for field in ENCODER_CONFIG_FIELDS}
    for field in ("image_size", "patch_size"):
        if isinstance(kwargs[field], tuple):
            kwargs[field] = list(kwargs[field])
    kwargs["encoder_stride"] = getattr(config, "encoder_stride", None) or _as_int(config.patch_size)
    return ViTConfig(**kwargs)


def _split(model: PreTrainedModel) -> tuple[type[PreTrainingMethod], PreTrainedModel]:
    """(its method, the encoder to export: `PreTrainingMethod.released_encoder`) for a pre-training model, or its encoder
    alone; ValueError for anything else."""
    method = _method(model, f"the given {type(model).__name__}")
    encoder_classes = (method.base_model_class, *method.upstream_encoder_classes)
    return method, model if isinstance(model, encoder_classes) else method.released_encoder(model)


def encoder_state_dict(encoder: PreTrainedModel, dropped: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The encoder's weights under the stock encoder's keys (`PreTrainingMethod.stock_encoder_class`: the names are
    the same), without the ``dropped`` ones (`PreTrainingMethod.export_dropped_keys`, e.g. SimMIM's mask token)."""
    return {key: value for key, value in encoder.state_dict().items() if key not in dropped}


def _check_keys(stock: set[str], weights: set[str], method: type[PreTrainingMethod]) -> None:
    """Raise a `ValueError` unless the encoder's ``weights`` fill every key of the ``stock`` encoder but the
    method's `stock_encoder_new_keys`, and nothing else."""
    missing = sorted(key for key in stock - weights if not key.startswith(method.stock_encoder_new_keys))
    unexpected = sorted(weights - stock)
    if missing or unexpected:
        raise ValueError(
            f"the pre-trained encoder does not fill {method.stock_encoder_class.__name__}: missing {missing}, "
            f"unexpected {unexpected} (only keys starting with {list(method.stock_encoder_new_keys)} may be new)"
        )


def _load(checkpoint: str | os.PathLike, hub_kwargs: dict) -> PreTrainedModel:
    config_dict, _ = PreTrainedConfig.get_config_dict(checkpoint, **hub_kwargs)
    model_class = _method(config_dict, f"checkpoint {str(checkpoint)!r}").model_class
    model, info = model_class.from_pretrained(checkpoint, output_loading_info=True, **hub_kwargs)
    # Only the encoder is exported: a checkpoint without the pre-training head still exports.
    head = {key for key in newly_initialised_keys(info) if not key.startswith(f"{model.base_model_prefix}.")}
    check_loading_info(info, checkpoint, model_class.__name__, allowed_new=head)
    return model


def _image_processor(source: str | None, config: ViTConfig, hub_kwargs: dict):
    """The source checkpoint's image processor when it has one, else the one our recipes save."""
    if source is not None:
        found = cached_file(
            source, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False, **hub_kwargs
        )
        if found is not None:
            return AutoImageProcessor.from_pretrained(source, **hub_kwargs)
    height = width = config.image_size
    if isinstance(config.image_size, (list, tuple)):
        height, width = config.image_size
    return ViTImageProcessor(
        size={"height": height, "width": width},
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
        do_convert_rgb=True,
    )


def _model_card(
    source_name: str, method: type[PreTrainingMethod], model_type: str, source_class: str, config: ViTConfig, path: str
) -> str:
    origin = f"{method.name} pre-training"
    if method.extended_class(model_type) is None:  # ours, not an upstream class it extends
        origin += f" with Masked Token Optimization in the {' and '.join(method.mto_stacks)}"
    position_note = method.card_notes
    stock = method.stock_encoder_class.__name__
    pooler = (
        "without pooling layer" if method.stock_encoder_kwargs.get("add_pooling_layer") is False else "with pooler"
    )
    pooler_note = (
        f" (without `add_pooling_layer=False`, `{stock}` adds a newly initialised pooler, which pre-training never had)"
        if method.stock_encoder_kwargs.get("add_pooling_layer") is False
        else ""
    )
    features_kwargs = "".join(f", {name}={value}" for name, value in method.stock_encoder_kwargs.items())
    return f"""---
library_name: transformers
pipeline_tag: image-feature-extraction
tags:
- vision
- {config.model_type}
- hf-mto
---

# {stock.removesuffix("Model")} encoder exported from `{source_name}`

A plain transformers encoder (`model_type: {config.model_type}`, `{stock}` weights {pooler}), exported with
`hf_mto.export.export_encoder` from the {source_class} `{source_name}` (model_type `{model_type}`): {origin}.
The pre-training decoder is not included. It loads with transformers alone: no `hf_mto`, no `trust_remote_code`.

| image size | patch size | hidden size | layers | heads | MLP size |
|---|---|---|---|---|---|
| {config.image_size} | {config.patch_size} | {config.hidden_size} | {config.num_hidden_layers} \
| {config.num_attention_heads} | {config.intermediate_size} |

{position_note}

## Fine-tune

```python
from transformers import AutoImageProcessor, AutoModelForImageClassification

processor = AutoImageProcessor.from_pretrained("{path}")
model = AutoModelForImageClassification.from_pretrained("{path}", num_labels=10, ignore_mismatched_sizes=True)
```

Set `num_labels` to your number of classes: only the classifier is newly initialised. transformers' example
[`run_image_classification.py`](https://github.com/huggingface/transformers/tree/main/examples/pytorch/image-classification)
works as is: `python run_image_classification.py --model_name_or_path {path} --ignore_mismatched_sizes ...`.

Features: `{stock}.from_pretrained("{path}"{features_kwargs})(pixel_values).last_hidden_state`{pooler_note}.
"""


def _verify(output_dir: Path, expected: dict[str, torch.Tensor], method: type[PreTrainingMethod]) -> None:
    """Reload the export and check it key by key against the encoder's weights ``expected`` (the method's
    `stock_encoder_new_keys` aside)."""
    reloaded, info = method.stock_encoder_class.from_pretrained(
        output_dir, **method.stock_encoder_kwargs, dtype="auto", output_loading_info=True
    )
    problems = {name: info[name] for name in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[name]}
    if problems:
        raise RuntimeError(f"exported encoder in {output_dir} does not reload cleanly: {problems}")
    state = reloaded.state_dict()
    exported = {key for key in state if not key.startswith(method.stock_encoder_new_keys)}
    if exported != set(expected):
        raise RuntimeError(f"exported keys differ: {sorted(exported ^ set(expected))}")
    for key, value in expected.items():
        if state[key].dtype != value.dtype or not torch.equal(state[key], value.to(state[key].device)):
            raise RuntimeError(f"exported weight {key!r} differs from the pre-trained encoder's")


def export_encoder(
    checkpoint_or_model: str | os.PathLike | PreTrainedModel,
    output_dir: str | os.PathLike,
    image_processor=None,
    **hub_kwargs,
) -> Path:
    """Write the encoder of a pre-trained hf_mto model as a plain transformers ViT checkpoint; returns `output_dir`.

    Args:
        checkpoint_or_model: a local checkpoint directory or Hub id of a `ViTMAEMTOForPreTraining` /
            `SimMIMMTOForMaskedImageModeling` (a Trainer `checkpoint-N` folder works), or such a model instance (or
            its `.vit` encoder).
        output_dir: where to write `config.json`, the weights, `preprocessor_config.json` and `README.md`.
        image_processor: saved as is when given. Otherwise the checkpoint's `preprocessor_config.json` is copied (for
            an instance: the one in its `name_or_path` directory, if any), else a `ViTImageProcessor` resizing to the
            model's size with ImageNet mean/std is written.
        hub_kwargs: passed to the Hub loaders (`revision`, `token`, `cache_dir`, ...).

    Raises:
        ValueError: the input is not one of ours (the message names its model type), its checkpoint lacks encoder
            weights, or `output_dir` is the checkpoint directory itself.
        RuntimeError: the export does not reload into `ViTModel` with weights equal, key by key, to the encoder's.
    """
    output_dir = Path(output_dir)
    if isinstance(checkpoint_or_model, (str, os.PathLike)):
        source = str(checkpoint_or_model)
        if os.path.isdir(source) and output_dir.resolve() == Path(source).resolve():
            raise ValueError(f"output_dir must differ from the checkpoint directory {source!r}")
        model = _load(source, hub_kwargs)
        source_name = source
    elif isinstance(checkpoint_or_model, torch.nn.Module):
        model = checkpoint_or_model
        source_name = getattr(model, "name_or_path", "") or None
        source = source_name if source_name and os.path.isdir(source_name) else None
    else:
        raise TypeError(
            f"checkpoint_or_model must be a path, a Hub id or a model, got {type(checkpoint_or_model).__name__}"
        )
    method, encoder = _split(model)
    config = method.stock_encoder_config(model.config)
    vit = method.stock_encoder_class(config, **method.stock_encoder_kwargs)
    weights = encoder_state_dict(encoder, method.export_dropped_keys)
    _check_keys(set(vit.state_dict()), set(weights), method)
    vit.to(dtype=encoder.embeddings.patch_embeddings.projection.weight.dtype)
    # not strict: the method's new keys (BeitModel's pooler) keep the stock model's initial values; _check_keys
    # made sure that nothing else is left unfilled
    vit.load_state_dict(weights, strict=False)
    vit.eval()

    output_dir.mkdir(parents=True, exist_ok=True)
    vit.save_pretrained(output_dir)
    if image_processor is None:
        image_processor = _image_processor(source, config, hub_kwargs if source is not None else {})
    image_processor.save_pretrained(output_dir)
    (output_dir / "README.md").write_text(
        _model_card(
            source_name or type(model).__name__,
            method,
            model.config.model_type,
            type(model).__name__,
            config,
            str(output_dir),
        )
    )
    _verify(output_dir, {key: value.detach().cpu() for key, value in weights.items()}, method)
    return output_dir


__all__ = ["ENCODER_CONFIG_FIELDS", "encoder_config", "encoder_state_dict", "export_encoder"]
