"""Quick evaluation of a pre-trained encoder: k-NN and linear-probe accuracy of its frozen features.

Both are proxies for fine-tuning accuracy that cost seconds, so they can run at every evaluation of a pre-training
run (`EncoderEvalCallback`) or on any checkpoint (`recipes/evaluate_encoder.py`):

* **Features** (`encoder_features`): the encoder's output after its final layernorm on the *whole* image (no patch
  masked), pooled as the CLS token (`pooling="cls"`, the default, as MAE's linear probe and DINO's k-NN) or the mean
  of the patch tokens (`"mean"`). Any of our models works -- `ViTMAEMTOForPreTraining` (whose encoder always drops
  patches in its own forward, so its modules are run here without the random masking),
  `SimMIMMTOForMaskedImageModeling` (called without `bool_masked_pos`) -- and so does any transformers ViT
  (`ViTModel`, an exported encoder, `ViTForImageClassification`, upstream ViTMAE). BEiT's encoder with
  `use_mean_pooling` (its default) has no final layernorm (an Identity): its features are the last block's raw
  outputs (`BeitMTOMethod.unmasked_encoder_output` says why).
* **k-NN** (`knn_predict`): weighted k-nearest neighbours as in InstDisc and DINO. Cosine similarity between the
  L2-normalised features; each of the k = 20 most similar training images votes for its class with weight
  exp(similarity / T), T = 0.07; the class with the largest total wins.
* **Linear probe** (`linear_probe_accuracy`): scikit-learn's `LogisticRegression` (multinomial, L-BFGS, L2 penalty
  `C`) on features standardised with the training set's mean and variance (MAE's CLS features are badly
  conditioned and L-BFGS needs hundreds of iterations). It is a quick
  proxy, not MAE's linear-probing protocol (90 epochs of LARS with a BatchNorm head and augmentation), so its numbers
  are comparable between checkpoints evaluated here, not with published linear-probe results.

Under several processes (accelerate, torchrun) each process extracts the features of its share of the images and
the shares are gathered, so every process then holds all features; the main process scores them (the probe's fit is
the slow part) and broadcasts the accuracies, so every process returns the same ones.
Under FSDP (version 2) every process first gathers the whole weights into a plain copy of the model
(`unsharded_model`), as the encoder's blocks run one by one, outside the model's own forward.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.utils.data import DataLoader, Subset
from transformers import TrainerCallback

from .data import PixelCollator, apply_transform, process_share
from .methods import PreTrainingMethod, method_for

logger = logging.getLogger(__name__)

POOLINGS = ("cls", "mean")


@dataclass
class EncoderEvalArguments:
    """k-NN and linear-probe evaluation of the encoder; parsed by `HfArgumentParser` (`hf_mto.cli.parse_args`)."""

    encoder_eval: bool = field(
        default=False,
        metadata={
            "help": "At every evaluation of pre-training, also compute the k-NN and linear-probe accuracy of the "
            "encoder's frozen features on the labelled data (logged as eval_knn_accuracy and "
            "eval_linear_probe_accuracy). Needs a label column."
        },
    )
    encoder_eval_pooling: str = field(
        default="cls", metadata={"help": f"Features: one of {POOLINGS} (CLS token or mean of the patch tokens)."}
    )
    knn_k: int = field(default=20, metadata={"help": "k-NN: number of neighbours (DINO's 20)."})
    knn_temperature: float = field(
        default=0.07, metadata={"help": "k-NN: votes are weighted by exp(cosine similarity / temperature)."}
    )
    linear_probe: bool = field(default=True, metadata={"help": "Also compute the linear-probe accuracy."})
    linear_probe_c: float = field(
        default=1.0, metadata={"help": "Linear probe: inverse L2 regularisation strength C of LogisticRegression."}
    )
    linear_probe_max_iter: int = field(
        default=1000,
        metadata={
            "help": "Linear probe: L-BFGS iterations at most. MAE's CLS features are badly conditioned and need "
            "several hundred; fewer cost accuracy."
        },
    )
    encoder_eval_train_samples: int | None = field(
        default=10000,
        metadata={
            "help": "Labelled training images (seeded random subset) forming the k-NN bank and the probe's training "
            "set. null: the whole training split."
        },
    )
    encoder_eval_eval_samples: int | None = field(
        default=None,
        metadata={"help": "Validation images scored (seeded random subset). null: the whole validation split."},
    )
    encoder_eval_batch_size: int = field(default=256, metadata={"help": "Batch size of the feature extraction."})

    def __post_init__(self):
        check_eval_settings(self.encoder_eval_pooling, self.knn_k, self.knn_temperature, self.linear_probe_c)
        for name in ("encoder_eval_train_samples", "encoder_eval_eval_samples"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be a positive integer (or null), got {value}")
        if self.linear_probe_max_iter < 1:
            raise ValueError(f"linear_probe_max_iter must be >= 1, got {self.linear_probe_max_iter}")
        if self.encoder_eval_batch_size <= 0:
            raise ValueError(f"encoder_eval_batch_size must be positive, got {self.encoder_eval_batch_size}")

    def settings(self) -> dict[str, Any]:
        """The keyword arguments of `evaluate_encoder` (and `EncoderEvalCallback`) these flags stand for."""
        return dict(
            pooling=self.encoder_eval_pooling,
            k=self.knn_k,
            temperature=self.knn_temperature,
            linear_probe=self.linear_probe,
            linear_probe_c=self.linear_probe_c,
            linear_probe_max_iter=self.linear_probe_max_iter,
            batch_size=self.encoder_eval_batch_size,
        )


def check_eval_settings(pooling: str, k: int, temperature: float, probe_c: float = 1.0) -> None:
    """ValueError naming the first bad value."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"knn k must be a positive integer, got {k!r}")
    if not temperature > 0:
        raise ValueError(f"knn temperature must be > 0, got {temperature}")
    if not probe_c > 0:
        raise ValueError(f"linear probe C must be > 0, got {probe_c}")


# ----------------------------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------------------------


def unsharded_model(model: torch.nn.Module, main_process_only: bool = False) -> torch.nn.Module | None:
    """`model` with whole weights, to run its submodules outside its own forward (the encoder's blocks one by one,
    a fixed batch on the main process alone).

    A model not sharded is returned as it is. A model sharded by FSDP2 (`torch.distributed.fsdp.fully_shard`, which
    accelerate's FSDP version 2 applies) holds a shard of each weight per process and gathers them only inside its
    forward; for it the full state is gathered and loaded into a plain copy (same class and config, the training
    mode and device of `model`): on every process, or with `main_process_only` on the main process only (the
    gathered weights go through its CPU memory; the others get None). Under FSDP2 this is collective: every process
    must call it, with the same `main_process_only`.
    """
    if not isinstance(model, FSDPModule):
        return model
    options = StateDictOptions(full_state_dict=True, cpu_offload=main_process_only)
    state = get_model_state_dict(model, options=options)
    if main_process_only and torch.distributed.get_rank() != 0:
        return None
    # fully_shard gives the module a class of its own, FSDP<Name>(FSDPModule, <Name>): the copy takes <Name>.
    plain_class = next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule))
    # The copy's random initialisation (overwritten at once) must not advance the training's random state, or turning
    # evaluation on would change the masks and augmentations that follow.
    with torch.random.fork_rng(devices=[]):
        copy = plain_class(model.config)
    copy.load_state_dict(state)
    device = next(model.parameters()).device  # the device of this process's shards
    return copy.to(device).train(model.training)


def resolve_encoder(model: torch.nn.Module) -> torch.nn.Module:
    """The ViT encoder of `model`: its base model (a pre-training or classification model keeps it as `.vit`, an
    encoder is its own), which must have ViT's `embeddings`, `layers` and final `layernorm`. DDP wrappers are
    unwrapped."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    encoder = getattr(model, "base_model", None)
    if encoder is None or not all(hasattr(encoder, name) for name in ("embeddings", "layers", "layernorm")):
        raise ValueError(
            f"cannot find a ViT encoder in a {type(model).__name__}: pass a ViT (ViTModel, ViTMAEModel, ...) or a "
            "model built on one (ViTMAEMTOForPreTraining, SimMIMMTOForMaskedImageModeling, ViTForImageClassification)"
        )
    return encoder


def encoder_features(model: torch.nn.Module, pixel_values: torch.Tensor, pooling: str = "cls") -> torch.Tensor:
    """``[B, D]`` features of the whole (unmasked) images: the encoder's output after its final layernorm, CLS token
    (`pooling="cls"`) or mean of the patch tokens (`"mean"`). Runs with the model's current autograd and train/eval
    state; `extract_features` wraps it in `no_grad` and eval mode.

    The encoder is the method's `released_encoder` (the one the export writes); it runs over every patch through its
    method's `unmasked_encoder_output` (a pre-training embedding
    module may always mask, as MAE's drops patches); a ViT no method declares (a classifier, an exported encoder) takes the generic declarations of `PreTrainingMethod`.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    encoder = resolve_encoder(model)
    try:
        method = method_for(encoder)
    except ValueError:
        method = PreTrainingMethod
    else:  # the encoder the run releases (ConMIM: its momentum encoder), as the export writes it
        whole = getattr(model, "module", model)
        encoder = encoder if whole is encoder else method.released_encoder(whole)
    pixel_values = pixel_values.to(encoder.embeddings.patch_embeddings.projection.weight.dtype)
    hidden = method.unmasked_encoder_output(encoder, pixel_values)  # [B, 1 + N, D]
    return hidden[:, 0] if pooling == "cls" else hidden[:, 1:].mean(dim=1)


def extract_features(
    model: torch.nn.Module,
    dataset,
    pooling: str = "cls",
    batch_size: int = 256,
    num_workers: int = 0,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of every example of a labelled dataset, gathered over all processes.

    Args:
        model: see `encoder_features`. Run in eval mode under `no_grad`; its training mode is restored afterwards.
        dataset: map-style, examples `{"pixel_values": [3, H, W] tensor, "label": int}` (`hf_mto.data.apply_transform`
            on a split with a label column). Unreadable images (`pixel_values` None) are left out.
        pooling: "cls" or "mean".
        autocast: optional factory of the context to run the forward in (e.g. the Trainer's autocast).

    Returns:
        ``(features [N, D] float32, labels [N] int64)`` on the CPU, in dataset order, the same on every process.
    """
    encoder = resolve_encoder(model)
    state = PartialState()
    loader = DataLoader(
        Subset(dataset, process_share(len(dataset), state)),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=PixelCollator(include_labels=True),
    )
    device = encoder.embeddings.patch_embeddings.projection.weight.device
    features = [torch.empty(0, encoder.config.hidden_size)]
    labels = [torch.empty(0, dtype=torch.long)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                with autocast() if autocast is not None else contextlib.nullcontext():
                    batch_features = encoder_features(model, batch["pixel_values"].to(device), pooling)
                features.append(batch_features.float().cpu())
                labels.append(batch["labels"])
    finally:
        model.train(was_training)
    local = (torch.cat(features), torch.cat(labels))
    if state.num_processes == 1:
        return local
    shares = gather_object([local])  # one (features, labels) per process, in process order
    return torch.cat([share[0] for share in shares]), torch.cat([share[1] for share in shares])


# ----------------------------------------------------------------------------------------------------------------
# k-NN and linear probe
# ----------------------------------------------------------------------------------------------------------------


def _check_labelled(name: str, features: torch.Tensor, labels: torch.Tensor) -> None:
    if features.ndim != 2 or labels.ndim != 1 or features.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{name}: features must be [N, D] and labels [N]; got {list(features.shape)} and {list(labels.shape)}"
        )
    if features.shape[0] == 0:
        raise ValueError(f"{name}: no examples")


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted k-NN classification (InstDisc, DINO): cosine similarity, votes weighted by exp(similarity / T).

    Args:
        train_features: ``[N, D]`` the bank. train_labels: ``[N]`` class indices >= 0.
        query_features: ``[M, D]``.
        k: neighbours; more than N uses all N.
        temperature: T of the vote weights exp(s / T).
        num_classes: default `max(train_labels) + 1`.
        chunk_size: queries per similarity block (bounds memory at chunk_size x N).

    Returns:
        ``(predictions [M] int64, class scores [M, C])``: the scores are the normalised votes,
        score_c = sum over the k neighbours of class c of exp(s / T), divided by the sum over all k (computed
        relative to each query's best similarity, which cancels in the ratio, so small T cannot overflow). Ties go
        to the lower class index.
    """
    _check_labelled("knn bank", train_features, train_labels)
    if query_features.ndim != 2 or query_features.shape[1] != train_features.shape[1]:
        raise ValueError(f"query features must be [M, {train_features.shape[1]}], got {list(query_features.shape)}")
    check_eval_settings("cls", k, temperature)
    train_labels = train_labels.long()
    if (train_labels < 0).any():
        raise ValueError("knn labels must be class indices >= 0")
    num_classes = int(train_labels.max()) + 1 if num_classes is None else num_classes
    k = min(k, train_features.shape[0])
    bank = torch.nn.functional.normalize(train_features.float(), dim=1)
    predictions, scores = [], []
    for start in range(0, query_features.shape[0], chunk_size):
        queries = torch.nn.functional.normalize(query_features[start : start + chunk_size].float(), dim=1)
        similarity, index = (queries @ bank.T).topk(k, dim=1)  # [m, k], best first
        weights = ((similarity - similarity[:, :1]) / temperature).exp()
        votes = torch.zeros(queries.shape[0], num_classes).scatter_add_(1, train_labels[index], weights)
        votes = votes / votes.sum(dim=1, keepdim=True)
        predictions.append(votes.argmax(dim=1))
        scores.append(votes)
    return torch.cat(predictions), torch.cat(scores)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Fraction of `test_labels` that `knn_predict` gets right."""
    _check_labelled("knn test set", test_features, test_labels)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    predictions, _ = knn_predict(train_features, train_labels, test_features, k, temperature, num_classes)
    return (predictions == test_labels.long()).float().mean().item()


def linear_probe_accuracy(
    train_features: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_features: torch.Tensor | np.ndarray,
    test_labels: torch.Tensor | np.ndarray,
    c: float = 1.0,
    max_iter: int = 1000,
) -> float:
    """Accuracy on the test set of a logistic regression trained on the (frozen) training features.

    Features are standardised with the training set's statistics (`StandardScaler`), then scikit-learn's
    `LogisticRegression(C=c)` (multinomial, L-BFGS) is fitted. Deterministic.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    arrays = [np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x) for x in (train_features, train_labels)]
    test = [np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x) for x in (test_features, test_labels)]
    for name, (features, labels) in (("probe training set", arrays), ("probe test set", test)):
        _check_labelled(name, torch.as_tensor(features), torch.as_tensor(labels))
    if len(np.unique(arrays[1])) < 2:
        raise ValueError(f"the linear probe needs at least 2 classes in its training set, got {np.unique(arrays[1])}")
    if not c > 0:
        raise ValueError(f"linear probe C must be > 0, got {c}")
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
    probe.fit(arrays[0].astype(np.float64), arrays[1])
    return float(np.mean(probe.predict(test[0].astype(np.float64)) == test[1]))


def evaluate_encoder(
    model: torch.nn.Module,
    train_dataset,
    eval_dataset,
    pooling: str = "cls",
    k: int = 20,
    temperature: float = 0.07,
    linear_probe: bool = True,
    linear_probe_c: float = 1.0,
    batch_size: int = 256,
    num_workers: int = 0,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    linear_probe_max_iter: int = 1000,
) -> dict[str, float]:
    """k-NN (and linear-probe) accuracy on `eval_dataset` of the encoder's features, fitted on `train_dataset`.

    Both datasets hold `{"pixel_values", "label"}` examples (see `extract_features`). Returns `knn_accuracy`,
    `linear_probe_accuracy` (when `linear_probe`), `num_train` and `num_eval`.
    """
    check_eval_settings(pooling, k, temperature, linear_probe_c)
    train_x, train_y = extract_features(model, train_dataset, pooling, batch_size, num_workers, autocast)
    test_x, test_y = extract_features(model, eval_dataset, pooling, batch_size, num_workers, autocast)

    def scores() -> dict[str, float]:
        results = {"knn_accuracy": knn_accuracy(train_x, train_y, test_x, test_y, k, temperature)}
        if linear_probe:
            results["linear_probe_accuracy"] = linear_probe_accuracy(
                train_x, train_y, test_x, test_y, linear_probe_c, linear_probe_max_iter
            )
        return results

    state = PartialState()
    if state.num_processes == 1:
        results = scores()
    else:
        # Every process holds all features, but the probe's fit is the slow part: the main process scores, the others
        # receive its results -- or its error, so that no process waits for a broadcast that never comes.
        outcome = [None]
        if state.is_main_process:
            try:
                outcome[0] = scores()
            except Exception as error:  # re-raised below, on every process
                outcome[0] = error
        outcome = broadcast_object_list(outcome, from_process=0)
        if isinstance(outcome[0], Exception):
            raise outcome[0]
        results = outcome[0]
    results.update(num_train=float(len(train_y)), num_eval=float(len(test_y)))
    return results


def labelled_eval_splits(
    datasets, transform: Callable, eval_args: EncoderEvalArguments, seed: int = 42
) -> tuple[Any, Any]:
    """(bank, queries): the "train" and "validation" splits of `hf_mto.data.load_datasets` with `transform` (the
    deterministic eval transform) applied, each cut to a seeded random subset of `eval_args`' sizes.

    Raises:
        ValueError: a split is missing or has no "label" column.
    """
    splits = []
    for name, limit in (
        ("train", eval_args.encoder_eval_train_samples),
        ("validation", eval_args.encoder_eval_eval_samples),
    ):
        if name not in datasets:
            raise ValueError(f"encoder evaluation needs a {name!r} split; the data has {list(datasets)}")
        split = datasets[name]
        if "label" not in split.column_names:
            raise ValueError(
                f"encoder evaluation needs labels, but the {name} split has no label column (columns: "
                f"{split.column_names}); name it with --label_column_name, or turn --encoder_eval off"
            )
        if limit is not None and limit < len(split):
            split = split.shuffle(seed=seed).select(range(limit))
        splits.append(apply_transform(split, transform))
    return splits[0], splits[1]


# ----------------------------------------------------------------------------------------------------------------
# Trainer callback
# ----------------------------------------------------------------------------------------------------------------


class EncoderEvalCallback(TrainerCallback):
    """Adds the encoder's k-NN and linear-probe accuracy to every evaluation of a Trainer.

    On `on_evaluate` it extracts the features of `train_dataset` (bank / probe training set) and `eval_dataset`
    (scored) with the model being trained, and adds `{prefix}_knn_accuracy` and `{prefix}_linear_probe_accuracy`
    (prefix "eval" by default, the evaluation's own prefix otherwise) to the metrics `Trainer.evaluate()` returns,
    so `metric_for_best_model` can use them. The Trainer has already logged its metrics when callbacks run, so to
    log these too (log history, TensorBoard, ...) the callback needs the trainer: add it with `attach`:

        callback = EncoderEvalCallback(train_dataset, eval_dataset).attach(trainer)

    Both datasets yield `{"pixel_values", "label"}` (e.g. `labelled_eval_splits`), with a deterministic transform.
    One evaluation per training step: several evaluation datasets share the first one's numbers.
    """

    def __init__(
        self,
        train_dataset,
        eval_dataset,
        pooling: str = "cls",
        k: int = 20,
        temperature: float = 0.07,
        linear_probe: bool = True,
        linear_probe_c: float = 1.0,
        batch_size: int = 256,
        num_workers: int = 0,
        trainer=None,
        linear_probe_max_iter: int = 1000,
    ):
        check_eval_settings(pooling, k, temperature, linear_probe_c)
        for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            if dataset is None or len(dataset) == 0:
                raise ValueError(f"EncoderEvalCallback needs a non-empty labelled {name}")
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.settings = dict(
            pooling=pooling,
            k=k,
            temperature=temperature,
            linear_probe=linear_probe,
            linear_probe_c=linear_probe_c,
            linear_probe_max_iter=linear_probe_max_iter,
            batch_size=batch_size,
            num_workers=num_workers,
        )
        self.trainer = trainer
        self._cache: tuple[int, dict[str, float]] | None = None
        self._warned = False

    @classmethod
    def from_args(cls, train_dataset, eval_dataset, args: EncoderEvalArguments, **kwargs) -> EncoderEvalCallback:
        return cls(train_dataset, eval_dataset, **args.settings(), **kwargs)

    def attach(self, trainer) -> EncoderEvalCallback:
        """Add this callback to `trainer` and log through it; returns self."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        if model is None or metrics is None:
            return
        if self._cache is None or self._cache[0] != state.global_step:
            autocast = self.trainer.autocast_smart_context_manager if self.trainer is not None else None
            # Under FSDP the encoder's blocks run one by one, outside the model's forward: on whole weights.
            results = evaluate_encoder(
                unsharded_model(model), self.train_dataset, self.eval_dataset, autocast=autocast, **self.settings
            )
            self._cache = (state.global_step, results)
        results = self._cache[1]
        prefix = next((key[: -len("_runtime")] for key in metrics if key.endswith("_runtime")), "eval")
        new = {f"{prefix}_{name}": value for name, value in results.items() if name.endswith("accuracy")}
        metrics.update(new)
        if self.trainer is not None:
            self.trainer.log(dict(new))
        elif not self._warned:
            self._warned = True
            logger.warning(
                "EncoderEvalCallback was not attached to its trainer (`callback.attach(trainer)`): %s are returned by "
                "evaluate() but not logged",
                sorted(new),
            )


__all__ = [
    "POOLINGS",
    "EncoderEvalArguments",
    "EncoderEvalCallback",
    "encoder_features",
    "evaluate_encoder",
    "extract_features",
    "knn_accuracy",
    "knn_predict",
    "labelled_eval_splits",
    "linear_probe_accuracy",
    "resolve_encoder",
    "unsharded_model",
]
