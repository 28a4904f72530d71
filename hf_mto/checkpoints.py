"""Loading checkpoints so that no weight is silently newly initialised.

transformers' `from_pretrained` only *warns* when a checkpoint lacks weights of the model it builds, and the
Trainer's resume (`load_state_dict(state_dict, strict=False)` on the raw file) neither applies transformers 5's
legacy-key renaming nor complains: a checkpoint whose keys do not match ends up as a model with freshly initialised
layers that trains on as if nothing happened. Every place hf_mto loads weights goes through this module instead,
which stops with an error naming the weights that would be new.
"""

from __future__ import annotations

import os

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

from .methods import method_for

# How many weight names an error lists before it summarises the rest.
_NAMES_SHOWN = 8
# The weight files `save_pretrained` writes: one file or the index of shards, safetensors or torch.
_SAVE_PRETRAINED_WEIGHTS = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)


class IncompleteCheckpointError(ValueError):
    """A checkpoint does not provide every weight the model needs; ``keys`` are the weights that would be new."""

    def __init__(self, message: str, keys: list[str]):
        super().__init__(message)
        self.keys = keys


def newly_initialised_keys(loading_info: dict) -> list[str]:
    """The weights `from_pretrained(..., output_loading_info=True)` did not take from the checkpoint: missing ones and
    ones whose shape did not match (those are re-initialised under `ignore_mismatched_sizes=True`)."""
    mismatched = {entry[0] if isinstance(entry, (tuple, list)) else entry for entry in loading_info["mismatched_keys"]}
    return sorted(set(loading_info["missing_keys"]) | mismatched)


def check_loading_info(
    loading_info: dict,
    checkpoint: str | os.PathLike,
    model_class_name: str,
    allowed_new: set[str] | frozenset[str] = frozenset(),
) -> None:
    """Raise `IncompleteCheckpointError` when any weight other than ``allowed_new`` would be newly initialised.

    Args:
        loading_info: the dict `from_pretrained(..., output_loading_info=True)` returns.
        checkpoint: the path or Hub id, for the message.
        model_class_name: the class being loaded, for the message.
        allowed_new: weights that may legitimately be new (e.g. a classification head on a pre-training
            checkpoint).
    """
    new = [key for key in newly_initialised_keys(loading_info) if key not in allowed_new]
    if not new:
        return
    shown = ", ".join(new[:_NAMES_SHOWN]) + (
        f", ... ({len(new) - _NAMES_SHOWN} more)" if len(new) > _NAMES_SHOWN else ""
    )
    unexpected = loading_info.get("unexpected_keys") or []
    hint = (
        f" The checkpoint also holds {len(unexpected)} weights the model does not use (e.g. {sorted(unexpected)[0]}):"
        " it was probably written for another architecture or with key names this version cannot map."
        if unexpected
        else ""
    )
    raise IncompleteCheckpointError(
        f"checkpoint {str(checkpoint)!r} lacks {len(new)} weights of {model_class_name}, which would be newly "
        f"initialised: {shown}.{hint} Nothing was loaded; pass a checkpoint of this architecture.",
        new,
    )


def load_pretrained(
    model_class: type[PreTrainedModel],
    checkpoint: str | os.PathLike,
    allowed_new: set[str] | frozenset[str] = frozenset(),
    **kwargs,
) -> PreTrainedModel:
    """`model_class.from_pretrained(checkpoint, **kwargs)` that stops when a weight would be newly initialised.

    Args:
        model_class: a `PreTrainedModel` class (ours or upstream's).
        checkpoint: a local directory or Hub id.
        allowed_new: weights that may be new (see `check_loading_info`).
        kwargs: passed to `from_pretrained` (``config``, ``cache_dir``, ``token``, ...).

    Raises:
        IncompleteCheckpointError: naming the weights the checkpoint does not provide.
    """
    model, info = model_class.from_pretrained(checkpoint, output_loading_info=True, **kwargs)
    check_loading_info(info, checkpoint, model_class.__name__, allowed_new)
    return model


def load_pretraining_checkpoint(checkpoint: str | os.PathLike, **kwargs) -> PreTrainedModel:
    """The pre-training model of a checkpoint, through the method that declares its model type (see
    `hf_mto.methods.method_for`): ours by their own class, an upstream one (the Hub's official MAE, anything
    `ViTForMaskedImageModeling` saved) by the class of ours that extends it, on its own weights.

    Raises:
        ValueError: naming the model type when no method declares it.
        IncompleteCheckpointError: the checkpoint lacks weights of the model.
    """
    config_dict, _ = PretrainedConfig.get_config_dict(checkpoint, **kwargs)
    method = method_for(config_dict)
    config = method.config_class.from_pretrained(checkpoint, **kwargs)
    return load_pretrained(method.model_class, checkpoint, config=config, **kwargs)


def load_weights_into(model: PreTrainedModel, checkpoint: str | os.PathLike) -> None:
    """Copy a saved checkpoint's weights into ``model`` in place (the Trainer's resume and best-model reload).

    Goes through `from_pretrained`, so transformers' key renaming applies: `save_pretrained` writes upstream's legacy
    key names (``encoder.layer.0.attention.attention.query``), which a plain ``load_state_dict`` would not match.
    Strict both ways: a weight missing from the checkpoint or one the model does not have is an error.
    """
    loaded, info = type(model).from_pretrained(
        checkpoint, config=model.config, dtype=torch.float32, output_loading_info=True
    )
    check_loading_info(info, checkpoint, type(model).__name__)
    if info["unexpected_keys"]:
        raise IncompleteCheckpointError(
            f"checkpoint {str(checkpoint)!r} holds {len(info['unexpected_keys'])} weights {type(model).__name__} does "
            f"not have (e.g. {sorted(info['unexpected_keys'])[:_NAMES_SHOWN]}): it is not a checkpoint of this model",
            sorted(info["unexpected_keys"]),
        )
    model.load_state_dict(loaded.state_dict(), strict=True)


class ConvertedCheckpointsMixin:
    """For `Trainer` subclasses: resume and `load_best_model_at_end` load the saved weights through
    `load_weights_into` instead of the stock non-strict ``load_state_dict`` of the raw file, which misses every weight
    `save_pretrained` wrote under a legacy name and only logs a warning about it.

    Every checkpoint `save_pretrained` wrote (one file or sharded, safetensors or not) goes that way; FSDP and
    DeepSpeed checkpoints and PEFT adapters keep the Trainer's own loading (they are not written by `save_pretrained`).
    """

    def _saved_by_save_pretrained(self, checkpoint: str | None) -> bool:
        return (
            checkpoint is not None
            and not (self.is_fsdp_enabled or self.is_deepspeed_enabled)
            and any(os.path.isfile(os.path.join(checkpoint, name)) for name in _SAVE_PRETRAINED_WEIGHTS)
        )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not self._saved_by_save_pretrained(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_weights_into(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if not self._saved_by_save_pretrained(self.state.best_model_checkpoint):
            return super()._load_best_model()
        load_weights_into(self.accelerator.unwrap_model(self.model), self.state.best_model_checkpoint)


__all__ = [
    "ConvertedCheckpointsMixin",
    "IncompleteCheckpointError",
    "check_loading_info",
    "load_pretrained",
    "load_pretraining_checkpoint",
    "load_weights_into",
    "newly_initialised_keys",
]
