"""`MTOTrainingArguments` and `MTOTrainer`: the HF Trainer with the MTO loss terms weighted, summed and logged.

The models return the reconstruction loss and each raw MTO term; the trainer owns the weights:

    total = reconstruction + mto_spa_weight * L_spa + mto_e_weight * L_e + mto_r_weight * L_r

and logs every component (and the per-layer heterogeneity) averaged over the steps since the last log and over all
processes. With every weight 0 the model is called with `use_mto=False` and costs what the upstream model costs.
"""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from huggingface_hub.errors import HfHubHTTPError
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments

from .checkpoints import ConvertedCheckpointsMixin
from .evolved import EvolvedMasking

try:  # the HTTP client of huggingface_hub: httpx2 from version 2, httpx before
    from httpx2 import TransportError
except ImportError:  # pragma: no cover
    from httpx import TransportError
from . import model_card
from .log_keys import HETEROGENEITY_PREFIX
from .masking import MASKING_STRATEGIES, MaskGenerator, square_side
from .methods import PreTrainingMethod, method_for
from .mto import mean_heterogeneity

logger = logging.getLogger(__name__)

# Hub failures that a later retry can fix: offline mode, network down, timeouts, server errors (see
# `_hub_unreachable`); anything else (no token, no write access, bad repo id, a full disk) is raised.
HUB_UNREACHABLE = (ConnectionError, TimeoutError, TransportError, HfHubHTTPError)


def _hub_unreachable(error: BaseException) -> bool:
    if isinstance(error, HfHubHTTPError):
        status = getattr(getattr(error, "response", None), "status_code", None)
        return status is None or status >= 500 or status == 429
    return isinstance(error, HUB_UNREACHABLE)


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
        default=0.1, metadata={"help": "Weight of the sparsity loss L_spa (MTO Eq. 3). 0 disables it."}
    )
    mto_e_weight: float = field(
        default=0.1, metadata={"help": "Weight of the singularity loss L_e = 1/(H^0+eps) (MTO Eq. 6). 0 disables it."}
    )
    mto_r_weight: float = field(
        default=0.1, metadata={"help": "Weight of the ranking loss L_r (MTO Eq. 7). 0 disables it."}
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


def training_progress(state: TrainerState) -> float:
    """Training progress t, the fraction of the run done: ``global_step / max_steps``, in [0, 1) during training.

    This is the fractional epoch over the total epochs (DESIGN.md, evolved masking step 3), counted in optimizer
    steps. For a run of whole epochs it equals `state.epoch / state.num_train_epochs` at every step (at every epoch
    end when an epoch's batches do not divide into whole accumulation steps, since `state.epoch` counts batches).
    It is not taken from those two because the Trainer rounds `num_train_epochs` up, to 2 for a `max_steps` run of
    1.5 epochs or for `num_train_epochs=1.5`, which would stop the schedule at 3/4 of its span. Both counters are
    restored on resume, so a resumed run continues the schedule exactly.
    """
    if state.max_steps <= 0:  # before training starts (an evaluation first): the start of the schedule
        return 0.0
    # At most 1: a checkpoint of a longer run resumed with a smaller max_steps, evaluated without training further.
    return min(state.global_step / state.max_steps, 1.0)


class _MethodStepEnd(TrainerCallback):
    """Calls the method's `on_step_end` after every optimizer step (not after each accumulated micro-batch), with the
    training progress after that step; before the Trainer logs, evaluates or saves, so a checkpoint holds its
    effect (a teacher's update)."""

    def __init__(self, method: type[PreTrainingMethod]):
        self.method = method

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.method.on_step_end(getattr(model, "module", model), training_progress(state))


class MTOTrainer(ConvertedCheckpointsMixin, Trainer):
    """Trainer for every registered pre-training method (`hf_mto.methods`: ours, and the upstream classes they
    extend, such as ViTMAEForPreTraining): draws the masks, weights the MTO terms and logs every component.

    Masks are drawn inside the training step, on the device, from the global RNG (which the Trainer seeds and
    restores on resume), and reach the model through the method's `mask_inputs` (MAE: `noise`, SimMIM:
    `bool_masked_pos`). A batch that already carries the method's `mask_input_name` is left alone. A masking the
    model draws by itself (its `own_masking`: MAE's `random`) is left to it, exactly as upstream. After every
    optimizer step the method's `on_step_end` runs.
    """

    args: MTOTrainingArguments

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.method = method_for(self.accelerator.unwrap_model(self.model))
        self.mask_generator = self._build_mask_generator()
        self.add_callback(_MethodStepEnd(self.method))
        if isinstance(self.mask_generator, EvolvedMasking) and self.is_fsdp_enabled:
            # The similarity pass calls the encoder's blocks one by one, outside FSDP's forward, where their
            # parameters are still sharded.
            raise ValueError("evolved masking does not work under FSDP (sharded blocks); use DDP (multi_gpu.yaml)")
        # Sums and counts since the last log, per mode; tensors stay on the device until logging (no sync per step).
        self._metric_sums = {"train": defaultdict(lambda: 0.0), "eval": defaultdict(lambda: 0.0)}
        self._metric_counts = {"train": defaultdict(int), "eval": defaultdict(int)}
        self._eval_prefix: str | None = None  # set while `evaluate` runs

    def _build_mask_generator(self) -> MaskGenerator | EvolvedMasking | None:
        """The generator of the chosen masking (default the method's), None when the model draws it itself."""
        config = self.accelerator.unwrap_model(self.model).config
        strategy = self.args.masking or self.method.default_masking
        num_patches = (square_side(config.image_size) // square_side(config.patch_size)) ** 2
        if strategy == "evolved":
            depth = config.num_hidden_layers
            layers = self.args.evolved_attention_layers or max(1, depth // 2)
            if layers > depth:
                raise ValueError(f"evolved_attention_layers must be in [1, {depth}] for this model, got {layers}")
            generator = EvolvedMasking(config.mask_ratio, layers, self.args.evolved_f0, self.args.evolved_f1)
            num_masked = generator.num_masked(num_patches)
        else:
            generator = MaskGenerator(
                strategy,
                square_side(config.image_size),
                square_side(config.patch_size),
                config.mask_ratio,
                self.args.mask_patch_size,
            )
            num_masked = generator.num_masked
        if strategy == self.method.own_masking:
            return None  # the model's own draw: upstream's path, same distribution
        try:  # a model with a count of its own (MAE) checks that the generator's agrees
            self.method.num_masked(config, num_patches, num_masked)
        except ValueError as error:
            raise ValueError(f"{strategy} masking: {error}") from None
        return generator

    def _with_masks(self, model, inputs: dict) -> dict:
        if self.mask_generator is None or self.method.mask_input_name in inputs:
            return inputs
        pixel_values = inputs["pixel_values"]
        if isinstance(self.mask_generator, EvolvedMasking):
            # From the current weights, inside the step: the training progress comes from the Trainer state, so a
            # resumed run continues the depth schedule exactly where it stopped, mid-epoch included.
            with self.accelerator.autocast():
                mask, depth, height = self.mask_generator(
                    self.accelerator.unwrap_model(model), pixel_values, progress=training_progress(self.state)
                )
            self._record({"evolved/depth": depth.float().mean(), "evolved/tree_height": height.float().mean()})
        else:
            mask = self.mask_generator(pixel_values.shape[0], device=pixel_values.device)  # [B, N] bool
        return {**inputs, **self.method.mask_inputs(self.accelerator.unwrap_model(model), mask)}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**self._with_masks(model, inputs), use_mto=self.args.use_mto)
        loss = outputs.loss
        components = {"reconstruction_loss": outputs.loss}
        if self.args.use_mto:
            for name, weight in self.args.mto_weights().items():
                term = getattr(outputs, name)
                components[f"mto/{name}"] = term
                if weight > 0:
                    loss = loss + weight * term
            # Per image in the outputs; logged as the batch mean over the images where it is defined.
            for layer, value in enumerate(mean_heterogeneity(outputs.heterogeneity, outputs.mask)):
                components[f"{HETEROGENEITY_PREFIX}{layer}"] = value
        self._record(components)
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Pre-training batches carry no labels, so the stock step would skip the loss; evaluation here *is* the loss.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _record(self, components: dict[str, torch.Tensor]) -> None:
        mode = "train" if self.model.training else "eval"
        for key, value in components.items():
            self._metric_sums[mode][key] = self._metric_sums[mode][key] + value.detach().float()
            self._metric_counts[mode][key] += 1

    def _warn_non_finite(self, values: dict[str, float], mode: str) -> None:
        """Name the loss terms that went NaN/inf since the last log (checked here, where the means reach the host
        anyway, so training never waits on a per-step check)."""
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if not bad or not self.is_world_process_zero():  # the values are gathered: one process says it
            return
        # The loss components first: a term that is non-finite on its own is the culprit; heterogeneity diagnostics
        # follow whatever the states did.
        bad.sort(key=lambda k: (k.startswith("mto/heterogeneity/"), k))
        logger.warning(
            "%s step %d: non-finite %s since the last log (%s). Checkpoints saved so far are intact. With fp16 a "
            "transient overflow skips the step; if it persists, lower the weight of that term (mto_*_weight), use "
            "bf16, or resume from the last checkpoint.",
            mode,
            self.state.global_step,
            ", ".join(bad),
            ", ".join(f"{k}={values[k]}" for k in bad),
        )

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        # `log` prefixes the evaluation's components as the Trainer prefixes its own metrics (also for a dict of
        # eval datasets, where the Trainer calls evaluate once per dataset with "eval_<name>").
        outer, self._eval_prefix = self._eval_prefix, metric_key_prefix
        try:
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        finally:
            self._eval_prefix = outer

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self._eval_prefix is None else "eval"
        sums, counts = self._metric_sums[mode], self._metric_counts[mode]
        if sums:
            keys = sorted(sums)
            means = torch.stack([torch.as_tensor(sums[k]) / counts[k] for k in keys]).to(self.args.device)
            # One all-gather for every metric; every process reaches `log` at the same step with the same keys.
            means = self.accelerator.gather(means[None]).mean(dim=0)
            prefix = f"{self._eval_prefix}_" if mode == "eval" else ""
            values = dict(zip(keys, means.tolist(), strict=True))
            self._warn_non_finite(values, mode)
            logs.update({f"{prefix}{k}": v for k, v in values.items()})
            sums.clear()
            counts.clear()
        super().log(logs, start_time)

    # ---- Model card: written into every saved checkpoint and pushed as the repo's README.md ----

    # Facts about the run that the Trainer cannot see, as keyword arguments of `hf_mto.model_card.model_card_context`
    # (`data_args`, `license`, ...); the recipes set them.
    model_card_kwargs: dict | None = None

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
        recorded = dict(self.model_card_kwargs or {})
        given = {key: value for key, value in kwargs.items() if value is not None}
        if "tags" in given and "tags" in recorded:  # tags add up; everything else given wins
            given["tags"] = [
                tag
                for tags in (recorded["tags"], given["tags"])
                for tag in ([tags] if isinstance(tags, str) else tags)
            ]
        return model_card.render_model_card(model.config, self.args, self.state, **{**defaults, **recorded, **given})

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

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # The Trainer copies only the weights, config and processor of the checkpoint into output_dir and uploads
        # output_dir: bring the checkpoint's card along, when the push happens (the Trainer's own conditions).
        import shutil

        in_progress = getattr(self, "push_in_progress", None)
        busy = in_progress is not None and not in_progress.is_done()
        card = os.path.join(checkpoint_folder, "README.md")
        if (
            self.is_world_process_zero()
            and self.args.hub_strategy != "end"
            and (self.args.hub_always_push or not busy)
            and os.path.isfile(card)
        ):
            shutil.copy(card, os.path.join(self.args.output_dir, "README.md"))
        if (
            self.is_world_process_zero()
            and self.args.hub_strategy != "end"
            and getattr(self, "hub_model_id", None) is None
        ):
            self.init_hf_repo()  # the Hub was unreachable at start; try again, once per checkpoint
            if self.hub_model_id is None:
                return
        earlier = set(getattr(getattr(self, "push_in_progress", None), "jobs", None) or [])
        try:
            super()._push_from_checkpoint(checkpoint_folder)
        except HUB_UNREACHABLE as error:
            self._hub_failed(f"Pushing {checkpoint_folder}", error)
            return
        # The uploads run in the background and their errors would be dropped silently: report those of this push.
        for job in getattr(self.push_in_progress, "jobs", None) or []:
            if job not in earlier:
                job.add_done_callback(partial(self._report_upload, checkpoint_folder))

    # ---- The Hub is never allowed to cost a run or a checkpoint ----

    def _hub_failed(self, action: str, error: BaseException) -> None:
        logger.warning(
            "%s on the Hub (%s) failed: %s: %s. Training goes on and everything stays saved locally in %s; push it "
            "later with `hf upload %s %s`.",
            action,
            self.args.hub_model_id or Path(self.args.output_dir).absolute().name,
            type(error).__name__,
            error,
            self.args.output_dir,
            self.args.hub_model_id or "<user>/<repo>",
            self.args.output_dir,
        )

    def _report_upload(self, checkpoint_folder: str, job) -> None:
        if not job.cancelled() and job.exception() is not None:  # in the background: any failure is reported
            self._hub_failed(f"Uploading {checkpoint_folder}", job.exception())

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """The Trainer's, except that an unreachable Hub (offline, network down, server error) is a warning instead
        of an error before training starts: pushing is retried at each checkpoint and at the end. Errors that no
        retry can fix (no token, no write access, a malformed repo id) still stop the run before it trains."""
        try:
            super().init_hf_repo(token=token, private=private)
        except Exception as error:
            if not _hub_unreachable(error):
                raise
            self.hub_model_id = None
            self._hub_failed("Creating the repository", error)

    def push_to_hub(self, *args, **kwargs):
        """The Trainer's `push_to_hub`, which saves the model and its card locally first; an unreachable Hub is
        reported and returns None instead of raising, so the end of a run never loses what it trained."""
        if self.is_world_process_zero() and getattr(self, "hub_model_id", None) is None:
            self.init_hf_repo(token=kwargs.get("token"), private=kwargs.get("private"))
        if self.hub_model_id is None:  # still unreachable: save locally, as the push would have, and say so
            self.save_model(_internal_call=True)
            card_kwargs = {
                k: v
                for k, v in kwargs.items()
                if k not in ("commit_message", "blocking", "token", "revision", "private")
            }
            self.create_model_card(**card_kwargs)
            self._hub_failed("Pushing the final model", ConnectionError("the repository could not be created"))
            return None
        try:
            return super().push_to_hub(*args, **kwargs)
        except Exception as error:
            if not _hub_unreachable(error):
                raise
            self._hub_failed("Pushing the final model", error)
            return None
