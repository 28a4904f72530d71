"""Argument parsing and model construction shared by the recipes in `recipes/`.

`parse_args` reads `--config FILE.yaml|json` (a preset) and lets every other command-line flag override it, the way
trl's and alignment-handbook's recipes do; without `--config` it is plain `HfArgumentParser`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from .checkpoints import load_pretrained
from .methods import method_for, model_types


@dataclass
class ModelArguments:
    """Which model to pre-train and how it is configured."""

    model_type: str = field(
        default="vit_mae_mto", metadata={"help": "Model to pre-train: the model type of a registered method."}
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Checkpoint (local path or Hub id) to start from. Default: initialise from scratch."},
    )
    config_name: str | None = field(
        default=None, metadata={"help": "Config (local path or Hub id) to start from, if not the model's."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated config overrides applied to the (default or given) config, e.g. "
            "'hidden_size=64,num_hidden_layers=4,image_size=32,patch_size=4'."
        },
    )
    mask_ratio: float | None = field(default=None, metadata={"help": "Fraction of patches masked (config default)."})
    norm_pix_loss: bool | None = field(
        default=None, metadata={"help": "Reconstruct per-patch normalised pixels (MAE only; config default)."}
    )
    mto_spa_layers: list[int] | None = field(
        default=None, metadata={"help": "States where L_spa applies (0 = initial embedding). Config default [0]."}
    )
    mto_affinity: str | None = field(
        default=None,
        metadata={
            "help": "Affinity logits: cosine (/ mto_temperature, default), scaled (x.y / sqrt(D)) or dot (paper)."
        },
    )
    mto_temperature: float | None = field(default=None, metadata={"help": "Temperature of the cosine affinity."})
    mto_ranking: str | None = field(
        default=None, metadata={"help": "Ranking loss direction: intended (default) or literal (Eq. 7 as printed)."}
    )
    mto_eps: float | None = field(default=None, metadata={"help": "Epsilon of L_e = 1/(H^0 + eps)."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads are cached."})

    def __post_init__(self):
        if self.model_type not in model_types():
            raise ValueError(f"model_type must be one of {sorted(model_types())}, got {self.model_type!r}")

    def config_kwargs(self) -> dict:
        """The config fields given explicitly as arguments."""
        names = ("mask_ratio", "norm_pix_loss", "mto_spa_layers", "mto_affinity", "mto_temperature", "mto_ranking")
        kwargs = {name: getattr(self, name) for name in (*names, "mto_eps")}
        kwargs = {name: value for name, value in kwargs.items() if value is not None}
        fields = method_for(self.model_type).config_class().to_dict()
        unknown = sorted(name for name in kwargs if name not in fields)
        if unknown:  # e.g. norm_pix_loss, which only MAE has
            raise ValueError(
                f"{', '.join(unknown)} does not apply to {self.model_type!r}: its config has no such field"
            )
        return kwargs


def _parse_overrides(overrides: str | None, config_class) -> dict:
    """'a=1,b=x' -> {'a': 1, 'b': 'x'}, each value typed like the config field's default."""
    if not overrides:
        return {}
    defaults = config_class().to_dict()
    parsed = {}
    for item in overrides.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or key not in defaults:
            raise ValueError(
                f"config_overrides entry {item!r} is not 'field=value' with a field of {config_class.__name__}"
            )
        parsed[key] = yaml.safe_load(value)
    return parsed


def build_config(model_args: ModelArguments):
    config_class = method_for(model_args.model_type).config_class
    source = model_args.config_name or model_args.model_name_or_path
    kwargs = {**_parse_overrides(model_args.config_overrides, config_class), **model_args.config_kwargs()}
    if source:
        return config_class.from_pretrained(source, cache_dir=model_args.cache_dir, **kwargs)
    return config_class(**kwargs)


def build_model(model_args: ModelArguments, config):
    model_class = method_for(model_args.model_type).model_class
    if model_args.model_name_or_path:
        return load_pretrained(
            model_class, model_args.model_name_or_path, config=config, cache_dir=model_args.cache_dir
        )
    return model_class(config)


def parse_args(
    dataclass_types,
    argv: list[str] | None = None,
    default_config: str | Path | Callable[[list[str]], str | Path | None] | None = None,
):
    """Parse `dataclass_types` from `--config FILE` (YAML or JSON) plus command-line overrides.

    `default_config` is the preset used when no config file is named, so `accelerate launch recipes/pretrain.py`
    runs it and `... pretrain.py --num_train_epochs 1` runs it with one override. It may also be a function of the
    command line that picks the preset (pretrain.py: the tiny preset of the `--model_type` given), or None for none;
    it is called only when no config file is named.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    names_a_config = "--config" in argv or (argv and argv[0].endswith((".yaml", ".yml", ".json")))
    if callable(default_config) and not names_a_config:
        default_config = default_config(argv)
    if default_config is not None and not names_a_config:
        argv = ["--config", str(default_config), *argv]
    parser = HfArgumentParser(dataclass_types)
    config_file = None
    if "--config" in argv:
        at = argv.index("--config")
        if at + 1 >= len(argv):
            raise ValueError("--config needs a file path")
        config_file = Path(argv[at + 1])
        argv = argv[:at] + argv[at + 2 :]
    elif argv and argv[0].endswith((".yaml", ".yml", ".json")):
        config_file, argv = Path(argv[0]), argv[1:]
    if config_file is not None:
        if not config_file.is_file():
            raise FileNotFoundError(f"config file {str(config_file)!r} does not exist")
        text = config_file.read_text()
        values = json.loads(text) if config_file.suffix == ".json" else yaml.safe_load(text)
        if not isinstance(values, dict):
            raise ValueError(f"config file {str(config_file)!r} must hold a mapping of argument names to values")
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"config file {str(config_file)!r} has unknown arguments: {unknown}")
        # The file's values become defaults, so any flag on the command line still wins.
        parser.set_defaults(**values)
        for action in parser._actions:
            if action.dest in values:
                action.required = False
    return parser.parse_args_into_dataclasses(args=argv)
