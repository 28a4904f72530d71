"""Model cards of hf_mto pre-training checkpoints, rendered from the Jinja templates of the top-level `model_cards/`.

`render_model_card(config, args, state)` returns the markdown of a card (YAML front matter for the Hub, then model
and method, data, training set-up, final losses and per-layer heterogeneity from the Trainer's log history,
evaluation results, how to load and fine-tune, citations, framework versions); `write_model_card(directory, ...)`
writes it as `directory/README.md`. [`~hf_mto.trainer.MTOTrainer`] calls them for every checkpoint it saves and from
`push_to_hub`, so a pushed repo's README is this card.

```python
>>> from hf_mto.model_card import render_model_card
>>> card = render_model_card(trainer.model.config, trainer.args, trainer.state, data_args=data_args)
```

Where the templates are found: the project keeps them in the top-level `model_cards/` folder (the layout of
DESIGN.md), and `hf_mto/model_cards` is a symbolic link to it. Through the link, `importlib.resources` finds them
in a checkout and in an editable install, and setuptools copies the linked files into wheels and sdists as package
data (`model_cards/*.jinja` in pyproject.toml), so an installed package finds them too. A checkout without the link
(git with `core.symlinks=false`) falls back to the repository's `model_cards/` beside the package. `template=` also
takes the path of a template of your own.
"""

from __future__ import annotations

import importlib
import importlib.resources
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
from huggingface_hub import ModelCard, ModelCardData

from .log_keys import HETEROGENEITY_KEY, mto_log_prefix
from .log_keys import MTO_TERMS as TRAINER_MTO_TERMS
from .masking import square_side
from .methods import method_for

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "pretraining.md.jinja"
TEMPLATE_FOLDER = "model_cards"

# The Hub id of the dataset the embedded default data is a copy of (Debian's dataset-fashion-mnist).
FASHION_MNIST_HUB_ID = "zalando-datasets/fashion_mnist"

BASE_TAGS = ("vision", "vit", "masked-image-modeling", "mto", "hf-mto")

# (log key, symbol, where in the MTO paper) for the trainer's terms, logged as `mto/<key>`.
_PAPER = {
    "sparsity_loss": ("L_spa", "Eq. 3 (sparsity)"),
    "singularity_loss": ("L_e", "Eq. 6 (singularity)"),
    "ranking_loss": ("L_r", "Eq. 7 (ranking)"),
}
MTO_TERMS = tuple((key, *_PAPER[key]) for key in TRAINER_MTO_TERMS)
# Evaluation bookkeeping that is not a result.
_EVAL_BOOKKEEPING = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")
# Evaluation values the losses and heterogeneity tables already show.
_IN_LOSS_TABLE = ("eval_loss", "eval_reconstruction_loss")
# At most this many rows of the training log go into the card (evenly spaced, the last one always).
MAX_CURVE_ROWS = 20


def fmt(value: Any) -> str:
    """A number as the card prints it: ints as they are, floats to 4 significant digits, None as a dash."""
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if value == int(value) and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.4g}"


# ---------------------------------------------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------------------------------------------


def _template_text(template: str | os.PathLike) -> str:
    """The text of `template`: a path (a `PathLike`, or a string with a `/`), else a name in the templates folder
    (see the module docstring)."""
    name = str(template)
    if isinstance(template, os.PathLike) or "/" in name or os.sep in name:
        path = Path(template)
        if not path.is_file():
            raise FileNotFoundError(f"model card template {name!r} does not exist")
        return path.read_text(encoding="utf-8")
    packaged = importlib.resources.files(__package__).joinpath(TEMPLATE_FOLDER, name)
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    repository = Path(__file__).resolve().parent.parent / TEMPLATE_FOLDER / name
    if repository.is_file():
        return repository.read_text(encoding="utf-8")
    raise FileNotFoundError(
        f"model card template {name!r} is neither a file nor in hf_mto's {TEMPLATE_FOLDER}/ (looked in "
        f"{packaged} and {repository})"
    )


def _environment() -> jinja2.Environment:
    # StrictUndefined: a misspelt variable in a template is an error, not a silently empty card section.
    env = jinja2.Environment(
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True
    )
    env.globals["fmt"] = fmt
    return env


# ---------------------------------------------------------------------------------------------------------------
# Log history
# ---------------------------------------------------------------------------------------------------------------


def _is_eval(entry: Mapping) -> bool:
    return any(key.startswith("eval_") for key in entry)


def _heterogeneity(entry: Mapping | None, prefix: str) -> dict[int, float]:
    if not entry:
        return {}
    start = prefix + HETEROGENEITY_KEY
    return {int(key[len(start) :]): value for key, value in entry.items() if key.startswith(start)}


def _curve(train_logs: list[Mapping], eval_logs: list[Mapping]) -> list[dict]:
    if not train_logs:
        return []
    count = len(train_logs)
    if count <= MAX_CURVE_ROWS:
        picked = list(range(count))
    else:
        picked = sorted({round(i * (count - 1) / (MAX_CURVE_ROWS - 1)) for i in range(MAX_CURVE_ROWS)})
    eval_loss = {entry.get("step"): entry.get("eval_loss") for entry in eval_logs}
    return [
        {
            "step": train_logs[i].get("step"),
            "epoch": train_logs[i].get("epoch"),
            "loss": train_logs[i].get("loss"),
            "reconstruction_loss": train_logs[i].get("reconstruction_loss"),
            "eval_loss": eval_loss.get(train_logs[i].get("step")),
        }
        for i in picked
    ]


def summarise_log_history(log_history: Sequence[Mapping], mto_stacks: Sequence[str] = ()) -> dict:
    """The card's results from a Trainer's `state.log_history`, for a model whose method has ``mto_stacks`` (their
    metrics are logged under `hf_mto.log_keys.mto_log_prefix`: ``mto/`` for one stack, ``mto/<stack>/`` for each of
    several).

    Returns a dict with `final` (the last training log: step, epoch, values), `evaluation` (the last evaluation: step,
    epoch and every `eval_*` metric except timings, or None), `losses` (rows: label, train and eval values of the
    total loss, the reconstruction loss and each MTO term of each stack), `heterogeneity` (rows: layer (with its
    stack when there are several), train and eval value of `mto/heterogeneity/layer_<l>`), `evolved` (last
    `evolved/depth` and `evolved/tree_height`, or None) and `curve` (at most `MAX_CURVE_ROWS` rows of step, epoch,
    loss, reconstruction loss and the eval loss at that step).
    """
    train_logs = [e for e in log_history if not _is_eval(e) and ("reconstruction_loss" in e or "loss" in e)]
    # The Trainer logs its evaluation metrics before the callbacks run, so callback metrics (k-NN, linear probe)
    # arrive as separate entries at the same step: merge every eval_* entry of a step into that step's evaluation.
    merged: dict[int, dict] = {}
    for entry in log_history:
        if any(key.startswith("eval_") for key in entry):
            merged.setdefault(entry.get("step"), {}).update(entry)
    eval_logs = [e for e in merged.values() if "eval_loss" in e]
    final = train_logs[-1] if train_logs else None
    last_eval = eval_logs[-1] if eval_logs else None

    # log key prefix per MTO stack; rows name their stack only when there are several
    stacks = list(mto_stacks) or [""]
    prefixes = {(stack if len(stacks) > 1 else None): mto_log_prefix(stack, stacks) for stack in stacks}
    losses = []
    if final is not None or last_eval is not None:
        rows = [("total (weighted sum)", "loss"), ("reconstruction", "reconstruction_loss")]
        for stack, prefix in prefixes.items():
            named = f", {stack}" if stack else ""
            rows += [(f"{symbol} (unweighted){named}", f"{prefix}{key}") for key, symbol, _ in MTO_TERMS]
        for label, key in rows:
            train = final.get(key) if final else None
            evaluation = last_eval.get(f"eval_{key}") if last_eval else None
            if train is not None or evaluation is not None:
                losses.append({"label": label, "key": key, "train": train, "eval": evaluation})

    heterogeneity = []
    for stack, prefix in prefixes.items():
        train_h, eval_h = _heterogeneity(final, prefix), _heterogeneity(last_eval, f"eval_{prefix}")
        heterogeneity += [
            {
                "layer": layer,
                "train": train_h.get(layer),
                "eval": eval_h.get(layer),
                **({"stack": stack} if stack else {}),
            }
            for layer in sorted(set(train_h) | set(eval_h))
        ]

    evaluation = None
    if last_eval is not None:
        metrics = [
            (key, value)
            for key, value in last_eval.items()
            if key.startswith("eval_")
            and key not in _EVAL_BOOKKEEPING
            and key not in _IN_LOSS_TABLE
            and not key.startswith(("eval_mto/", "eval_evolved/"))
            and isinstance(value, (int, float))
        ]
        evaluation = {"step": last_eval.get("step"), "epoch": last_eval.get("epoch"), "metrics": metrics}

    evolved_log = next((e for e in reversed(train_logs) if "evolved/depth" in e), None)
    evolved = (
        {"depth": evolved_log["evolved/depth"], "tree_height": evolved_log.get("evolved/tree_height")}
        if evolved_log
        else None
    )
    return {
        "final": dict(final, step=final.get("step"), epoch=final.get("epoch")) if final else None,
        "evaluation": evaluation,
        "losses": losses,
        "heterogeneity": heterogeneity,
        "evolved": evolved,
        "curve": _curve(train_logs, eval_logs),
    }


# ---------------------------------------------------------------------------------------------------------------
# Context
# ---------------------------------------------------------------------------------------------------------------


def _method_info(config) -> dict:
    """What the card says about the model's method, from its declarations (`hf_mto.methods`). An upstream model that
    a method extends (MTOTrainer trains those too, without MTO terms) is described by its own class, loads without
    remote code and has no MTO stack."""
    model_type = getattr(config, "model_type", None)
    try:
        method = method_for(config)
    except ValueError:  # a model no method declares: the card says what any masked image model is
        return dict(
            method="masked image modeling",
            model_class=None,
            auto_class_name="AutoModel",
            mto_stacks=(),
            remote_code=False,
            default_masking="random",
            own_masking=None,
            architecture=[],
            citation="",
            export_model_type="vit",
        )
    extended = method.extended_class(model_type)
    ours = extended is None
    return dict(
        method=method.name,
        model_class=method.model_class.__name__ if ours else extended.__name__,
        auto_class_name=method.auto_class_name,
        mto_stacks=method.mto_stacks if ours else (),
        remote_code=ours,
        default_masking=method.default_masking,
        own_masking=method.own_masking,
        architecture=method.card_architecture(config),
        citation=method.citation,
        export_model_type=method.stock_encoder_class.config_class.model_type,
    )


def _model_info(config, model_class: str | None) -> dict:
    info = _method_info(config)
    info["model_type"] = getattr(config, "model_type", None)
    info["model_class"] = model_class or info["model_class"] or type(config).__name__
    image, patch = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    rows = []
    if image is not None and patch is not None:
        side = square_side(image) // square_side(patch)
        rows.append(("image / patch size", f"{image} px / {patch} px ({side * side} patches)"))
    rows.append(
        (
            "encoder",
            f"{config.num_hidden_layers} blocks, hidden size {config.hidden_size}, {config.num_attention_heads} "
            f"heads, MLP {config.intermediate_size}",
        )
    )
    rows += info.pop("architecture")  # the method's own rows: decoders, targets, a teacher
    info["has_decoder"] = any("decoder" in label for label, _ in rows)
    info["architecture"] = rows
    return info


def _mto_info(config, args, model: dict) -> dict:
    # Without MTOTrainingArguments the weights are unknown (they are training arguments, not part of the config).
    recorded = hasattr(args, "mto_weights")
    weights = args.mto_weights() if recorded else {key: 0.0 for key, _, _ in MTO_TERMS}
    enabled = bool(model["mto_stacks"]) and any(w > 0 for w in weights.values())
    terms = [
        {"key": key, "symbol": symbol, "paper": paper, "weight": weights[key], "on": weights[key] > 0}
        for key, symbol, paper in MTO_TERMS
    ]
    settings = []
    if enabled:
        affinity = getattr(config, "mto_affinity", "cosine")
        if affinity == "cosine":
            affinity = f"cosine / temperature {fmt(getattr(config, 'mto_temperature', None))}"
        settings = [
            ("L_spa on states", ", ".join(f"H^{layer}" for layer in getattr(config, "mto_spa_layers", [0]))),
            ("affinity logits", affinity),
            ("ranking-loss direction", getattr(config, "mto_ranking", "intended")),
            ("L_e epsilon", fmt(getattr(config, "mto_eps", None))),
        ]
    return {"enabled": enabled, "recorded": recorded, "weights": weights, "terms": terms, "settings": settings}


def _masking_info(config, args, model: dict) -> dict:
    strategy = getattr(args, "masking", None) or model["default_masking"]
    descriptions = {
        "random": "random patches",
        "simmim_block": f"SimMIM's square blocks of {getattr(args, 'mask_patch_size', 32)} px",
        "beit_block": "BEiT's block-wise masking",
        "bootmae_block": "BootMAE's: BEiT's rectangles over 120/196 of the patches, topped up with random patches",
        "evolved": "evolved hierarchical masking",
    }
    evolved = None
    if strategy == "evolved":
        layers = getattr(args, "evolved_attention_layers", None) or max(1, config.num_hidden_layers // 2)
        evolved = {"f0": args.evolved_f0, "f1": args.evolved_f1, "attention_layers": layers}
    description = f"`{strategy}`, " + descriptions.get(strategy, strategy)
    if strategy == model["own_masking"]:
        description += f" ({model['method']}'s own masking)"
    if args is None:
        description += " (the model's default; the training arguments were not recorded)"
    return {
        "strategy": strategy,
        "description": description,
        "mask_ratio": getattr(config, "mask_ratio", None),
        "evolved": evolved,
    }


def _data_info(data_args, dataset, dataset_args, train_size, eval_size) -> dict:
    hub_ids, config_name = [], None
    if data_args is not None and data_args.dataset_name:
        hub_ids, config_name = [data_args.dataset_name], data_args.dataset_config_name
    if dataset:  # given to `push_to_hub` / `create_model_card`: wins over data_args
        hub_ids = [dataset] if isinstance(dataset, str) else list(dataset)
    if dataset_args:
        config_name = dataset_args if isinstance(dataset_args, str) else ", ".join(dataset_args)
    if hub_ids:
        links = ", ".join(f"[`{name}`](https://huggingface.co/datasets/{name})" for name in hub_ids)
        description = f"Hub dataset {links}"
        if config_name:
            description += f", configuration `{config_name}`"
    elif data_args is not None and data_args.train_dir is not None:
        description = f"Local image folder `{data_args.train_dir}`"
    elif data_args is not None:
        description = (
            "The embedded Fashion-MNIST default (Debian's `dataset-fashion-mnist`, converted to RGB; on the Hub: "
            f"[`{FASHION_MNIST_HUB_ID}`](https://huggingface.co/datasets/{FASHION_MNIST_HUB_ID}))"
        )
        hub_ids = [FASHION_MNIST_HUB_ID]
    else:
        description = "Not recorded with this card"
    if data_args is not None and data_args.max_train_samples is not None:
        description += f"; a seeded random subset of at most {data_args.max_train_samples} training images"
    return {
        "description": description,
        "hub_ids": hub_ids,
        "config_name": config_name,
        "train_size": train_size,
        "eval_size": eval_size,
    }


def _hardware(args) -> str:
    import torch

    device = args.device
    processes = args.world_size
    if device.type == "cuda":
        kind = torch.cuda.get_device_name(device)
    elif device.type == "cpu":
        kind = "CPU"
    else:
        kind = device.type.upper()
    return f"{processes} x {kind}" if processes > 1 else f"1 {kind}"


def _precision(args) -> str:
    if args.bf16:
        precision = "bf16 mixed precision"
    elif args.fp16:
        precision = "fp16 mixed precision"
    else:
        precision = "fp32 (no mixed precision)"
    if getattr(args, "tf32", None):
        precision += ", TF32 matmuls"
    return precision


def _training_rows(args, state) -> list[tuple[str, str]]:
    rows = []
    if args.max_steps and args.max_steps > 0:
        rows.append(("length", f"{args.max_steps} steps"))
    else:
        rows.append(("epochs", fmt(args.num_train_epochs)))
    if state is not None and state.global_step:
        rows.append(("trained", f"{state.global_step} steps, epoch {fmt(state.epoch)}"))
    total = getattr(
        args,
        "total_train_batch_size",
        args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
    )
    rows.append(
        (
            "total batch size",
            f"{total} ({args.per_device_train_batch_size} per device x {args.gradient_accumulation_steps} "
            f"accumulation x {args.world_size} process{'es' if args.world_size > 1 else ''})",
        )
    )
    rows.append(("learning rate", fmt(args.learning_rate)))
    base = getattr(args, "base_learning_rate", None)
    if base is not None:
        rows.append(("base learning rate", f"{fmt(base)} (lr = base x total batch / {args.lr_scaling_batch_size})"))
    rows.append(("schedule", f"{getattr(args.lr_scheduler_type, 'value', args.lr_scheduler_type)}"))
    warmup = args.warmup_steps
    rows.append(("warm-up", f"{fmt(warmup)} of the steps" if 0 < warmup < 1 else f"{fmt(warmup)} steps"))
    optimizer = getattr(args.optim, "value", args.optim)
    rows.append(("optimizer", f"{optimizer}, betas ({fmt(args.adam_beta1)}, {fmt(args.adam_beta2)})"))
    rows.append(("weight decay", fmt(args.weight_decay)))
    if args.max_grad_norm:
        rows.append(("gradient clipping", fmt(args.max_grad_norm)))
    rows.append(("hardware", _hardware(args)))
    rows.append(("precision", _precision(args)))
    rows.append(("seed", str(args.seed)))
    return rows


def _versions() -> list[tuple[str, str]]:
    from . import __version__

    versions = [("hf_mto", __version__)]
    for package in ("transformers", "torch", "datasets", "accelerate"):
        try:  # the module's own version: torch's names its build (e.g. 2.14.1+cu130)
            versions.append((package, importlib.import_module(package).__version__))
        except ImportError:
            versions.append((package, "not installed"))
    return versions


def _dedupe(items) -> list:
    return list(dict.fromkeys(item for item in items if item))


def model_card_context(
    config,
    args=None,
    state=None,
    *,
    model_name: str | None = None,
    repo_id: str | None = None,
    model_class: str | None = None,
    data_args=None,
    dataset: str | Sequence[str] | None = None,
    dataset_args: str | Sequence[str] | None = None,
    train_size: int | None = None,
    eval_size: int | None = None,
    tags: str | Sequence[str] | None = None,
    license: str | None = None,
    base_model: str | None = None,
    checkpoint: bool = False,
) -> dict:
    """Every variable the templates use.

    Args:
        config: the model's config (`ViTMAEMTOConfig`, `SimMIMMTOConfig`, or upstream `ViTMAEConfig` / `ViTConfig`).
        args: the `MTOTrainingArguments` (or `TrainingArguments`) of the run; None leaves the training section out.
        state: the Trainer's `TrainerState`; its `log_history` gives the results.
        model_name: the card's title. Default: the last part of `repo_id`.
        repo_id: the Hub id or the path the "how to load" snippets use.
        model_class: the model's class name, when it is not the model type's usual one.
        data_args: the recipes' `DataArguments` (dataset name and configuration, image folder or embedded default).
        dataset, dataset_args: Hub dataset id(s) and configuration(s), as `Trainer.push_to_hub` passes them;
            override `data_args`.
        train_size, eval_size: number of training / evaluation images.
        tags: extra Hub tags, added to `BASE_TAGS` and the model type.
        license: the weights' license for the front matter (left out when None).
        base_model: the checkpoint pre-training started from (left out when None: from scratch).
        checkpoint: whether the card describes an intermediate `checkpoint-*` (says at which step).
    """
    model = _model_info(config, model_class)
    mto = _mto_info(config, args, model)
    masking = _masking_info(config, args, model)
    data = _data_info(data_args, dataset, dataset_args, train_size, eval_size)
    results = summarise_log_history(state.log_history if state is not None else [], model["mto_stacks"])

    if isinstance(tags, str):
        tags = [tags]
    all_tags = _dedupe(
        [
            *BASE_TAGS,
            model["model_type"],
            "evolved-hierarchical-masking" if masking["evolved"] else None,
            *(tags or []),
        ]
    )
    if not mto["enabled"] and (mto["recorded"] or not model["mto_stacks"]):
        all_tags.remove("mto")
    card_data = ModelCardData(
        library_name="transformers",
        license=license,
        tags=all_tags,
        datasets=data["hub_ids"] or None,
        base_model=base_model,
    )

    repo_id = repo_id or model_name or "path/to/checkpoint"
    method_summary = f"**{model['method']}**"
    if mto["enabled"]:
        method_summary += f" and **Masked Token Optimization (MTO)** on the {' and '.join(model['mto_stacks'])}"
    if masking["evolved"]:
        method_summary += ", masks from **Evolved Hierarchical Masking (EHM)**"
    return {
        "card_data": card_data.to_yaml(),
        "model_name": model_name or repo_id.rstrip("/").split("/")[-1],
        "repo_id": repo_id,
        "encoder_dir": f"{repo_id.rstrip('/').split('/')[-1]}-encoder",
        "base_model": base_model,
        "checkpoint": {"step": state.global_step, "epoch": state.epoch} if checkpoint and state is not None else None,
        "method_summary": method_summary,
        "model": model,
        "mto": mto,
        "masking": masking,
        "data": data,
        "training": _training_rows(args, state) if args is not None else None,
        "results": results,
        "versions": _versions(),
    }


def render_model_card(
    config, args=None, state=None, *, template: str | os.PathLike = DEFAULT_TEMPLATE, **kwargs
) -> str:
    """The markdown of the model card (YAML front matter first), rendered from `template`.

    `config`, `args` and `state` are the model's config, the training arguments and the Trainer's state (either of
    the last two may be None); `kwargs` are the keyword arguments of [`model_card_context`]. `template` is a file
    name in `model_cards/` or the path of a template of your own, which gets the same variables.

    Raises:
        ValueError: the rendered card's front matter is not valid Hub metadata.
    """
    text = (
        _environment()
        .from_string(_template_text(template))
        .render(**model_card_context(config, args, state, **kwargs))
    )
    text = re.sub(r"\n{3,}", "\n\n", text)  # sections a run does not have leave no gaps
    try:
        ModelCard(text, ignore_metadata_errors=False)
    except Exception as err:  # huggingface_hub raises ValueError or yaml errors; say which template did it
        raise ValueError(f"the model card rendered from {str(template)!r} has invalid front matter: {err}") from err
    return text


def write_model_card(directory: str | os.PathLike, config, args=None, state=None, **kwargs) -> Path:
    """Render the card (see [`render_model_card`]) and write it as `directory/README.md`; returns that path."""
    path = Path(directory) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_model_card(config, args, state, **kwargs), encoding="utf-8")
    return path


class ModelCardMixin:
    """For `Trainer` subclasses: every save (`checkpoint-*` folders, `save_model`, `push_to_hub`) writes the model
    card rendered from hf_mto's template beside the weights, and `create_model_card` (which `push_to_hub` calls)
    writes it in place of the Trainer's generic card."""

    def __init__(self, *args, model_card_kwargs: dict | None = None, **kwargs):
        """``model_card_kwargs``: facts about the run that the Trainer cannot see, as keyword arguments of
        `hf_mto.model_card.model_card_context` (`data_args`, `license`, ...)."""
        super().__init__(*args, **kwargs)
        self.model_card_kwargs = dict(model_card_kwargs or {})

    def _render_model_card(self, folder: str, **kwargs) -> str:
        model = self.accelerator.unwrap_model(self.model)
        defaults = {
            "repo_id": self.hub_model_id or self.args.hub_model_id or folder,
            "model_class": type(model).__name__,
        }
        for name, dataset in (("train_size", self.train_dataset), ("eval_size", self.eval_dataset)):
            if dataset is not None and not isinstance(dataset, dict) and hasattr(dataset, "__len__"):
                defaults[name] = len(dataset)
        source = getattr(model, "name_or_path", "") or ""
        if source and not os.path.isdir(source):  # started from a Hub checkpoint
            defaults["base_model"] = source
        recorded = dict(self.model_card_kwargs)
        given = {key: value for key, value in kwargs.items() if value is not None}
        if "tags" in given and "tags" in recorded:  # tags add up; everything else given wins
            given["tags"] = [
                tag
                for tags in (recorded["tags"], given["tags"])
                for tag in ([tags] if isinstance(tags, str) else tags)
            ]
        return render_model_card(model.config, self.args, self.state, **{**defaults, **recorded, **given})

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Every save (`checkpoint-*` folders, `save_model`, `push_to_hub`) writes the card beside the weights.
        super()._save(output_dir, state_dict=state_dict)
        if not self.args.should_save:
            return
        folder = output_dir if output_dir is not None else self.args.output_dir
        try:
            card = self._render_model_card(
                folder, checkpoint=os.path.basename(os.path.normpath(folder)).startswith("checkpoint-")
            )
        except Exception as err:  # a card must never cost a run its checkpoints
            logger.warning("could not write the model card into %s: %s", folder, err)
            return
        with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
            f.write(card)

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
        **kwargs,
    ) -> None:
        """Write `output_dir/README.md` from hf_mto's template (`model_cards/`, see `hf_mto.model_card`) in place of
        the Trainer's generic card. `push_to_hub(**kwargs)` calls it with its keyword arguments, then uploads the
        folder. `language`, `tasks` and `dataset_tags` are accepted for the Trainer's signature and not used; further
        keyword arguments go to `model_card_context`."""
        if not self.is_world_process_zero():
            return
        card = self._render_model_card(
            self.args.output_dir,
            license=license,
            tags=tags,
            model_name=model_name,
            base_model=finetuned_from,
            dataset=dataset,
            dataset_args=dataset_args,
            **kwargs,
        )
        with open(os.path.join(self.args.output_dir, "README.md"), "w", encoding="utf-8") as f:
            f.write(card)


__all__ = [
    "ModelCardMixin",
    "DEFAULT_TEMPLATE",
    "model_card_context",
    "render_model_card",
    "summarise_log_history",
    "write_model_card",
]
