"""`MTOTrainer`: the HF Trainer with the masks drawn inside the step and the MTO loss terms weighted, summed and logged.

The models return the reconstruction loss and each raw MTO term; the trainer owns the weights (`MTOTrainingArguments`,
`hf_mto.training_args`):

    total = loss + mto_spa_weight * L_spa + mto_e_weight * L_e + mto_r_weight * L_r

where ``loss`` is the model's own (the reconstruction loss; its parts are the method's `loss_components`) and each
MTO term is summed over the MTO stacks of a method with several. It logs every component (and the per-layer
heterogeneity) averaged over the steps since the last log and over all processes. With every weight 0 the model is
called with `use_mto=False` and costs what the upstream model costs. Checkpoint loading (`hf_mto.checkpoints`), the model card (`hf_mto.model_card`) and the Hub's failures
(`hf_mto.hub`) come from their modules' mixins.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict

import torch
from transformers import Trainer, TrainerCallback, TrainerState

from .checkpoints import ConvertedCheckpointsMixin
from .evolved import EvolvedMasking
from .hub import ResilientHubMixin
from .log_keys import HETEROGENEITY_KEY, mto_log_prefix
from .masking import MaskGenerator, square_side
from .methods import PreTrainingMethod, method_for
from .model_card import ModelCardMixin
from .mto import mean_heterogeneity
from .training_args import MTOTrainingArguments

logger = logging.getLogger(__name__)


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


class MTOTrainer(ConvertedCheckpointsMixin, ModelCardMixin, ResilientHubMixin, Trainer):
    """Trainer for every registered pre-training method (`hf_mto.methods`: ours, and the upstream classes they
    extend, such as ViTMAEForPreTraining): draws the masks, weights the MTO terms and logs every component.

    Masks are drawn inside the training step, on the device, from the global RNG (which the Trainer seeds and
    restores on resume), and reach the model through the method's `mask_inputs` (MAE: `noise`, SimMIM:
    `bool_masked_pos`). A batch that already carries the method's `mask_input_name` is left alone. A masking the
    model draws by itself (its `own_masking`: MAE's `random`) is left to it, exactly as upstream. After every
    optimizer step the method's `on_step_end` runs. With several MTO stacks (`mto_outputs`), each stack's terms
    are weighted alike, summed into the loss and logged under ``mto/<stack>/``.
    """

    args: MTOTrainingArguments

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        model = self.accelerator.unwrap_model(self.model)
        self.method = method_for(model)
        if self.args.use_mto and not isinstance(model, self.method.model_class):
            # an upstream class a method extends computes no MTO term: say so before training, not at the first step
            raise ValueError(
                f"{type(model).__name__} computes no MTO terms: train {self.method.model_class.__name__} (it loads "
                "the same weights) or set mto_spa_weight, mto_e_weight and mto_r_weight to 0"
            )
        self.mask_generator = self._build_mask_generator()
        if self.train_dataset is not None:  # what the method fits on the training data (BEiT's k-means tokenizer)
            # once per run where output_dir is shared by the nodes, once per node where each writes its own
            local = self.args.save_on_each_node
            with self.args.main_process_first(local=local, desc="the method's preparation for training"):
                self.method.prepare_training(model, self.train_dataset, self.args.output_dir, self.args.seed)
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
        model = self.accelerator.unwrap_model(self.model)
        config = model.config
        strategy = self.args.masking or self.method.default_masking
        num_patches = self.method.num_patches(model)
        if strategy == "evolved":
            depth = config.num_hidden_layers
            layers = self.args.evolved_attention_layers or max(1, depth // 2)
            if layers > depth:
                raise ValueError(f"evolved_attention_layers must be in [1, {depth}] for this model, got {layers}")
            generator = EvolvedMasking(
                config.mask_ratio, num_patches, layers, self.args.evolved_f0, self.args.evolved_f1
            )
        else:
            generator = MaskGenerator(
                strategy,
                square_side(config.image_size),
                square_side(config.patch_size),
                config.mask_ratio,
                self.args.mask_patch_size,
            )
        if strategy == self.method.own_masking:
            return None  # the model's own draw: upstream's path, same distribution
        try:  # a model with a count of its own (MAE) checks that the generator's agrees
            self.method.check_num_masked(config, num_patches, generator.num_masked)
        except ValueError as error:
            raise ValueError(f"{strategy} masking: {error}") from None
        return generator

    def _prepare_inputs(self, inputs: dict) -> dict:
        inputs = super()._prepare_inputs(inputs)
        # A collator may leave per-batch work for the device: PixelCollator normalises 8-bit images there, once per
        # batch, instead of per image in the loader workers.
        on_device = getattr(self.data_collator, "on_device", None)
        return inputs if on_device is None else on_device(inputs)

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
        components = dict(self.method.loss_components(outputs))
        if self.args.use_mto:
            stacks = self.method.mto_outputs(outputs)  # each MTO stack's terms, weighted alike and summed
            for stack, terms in stacks.items():
                prefix = mto_log_prefix(stack, self.method.mto_stacks)
                for name, weight in self.args.mto_weights().items():
                    term = getattr(terms, name)
                    components[f"{prefix}{name}"] = term
                    if weight > 0:
                        loss = loss + weight * term
                # Per image in the outputs; logged as the batch mean over the images where it is defined.
                for layer, value in enumerate(mean_heterogeneity(terms.heterogeneity, outputs.mask)):
                    components[f"{prefix}{HETEROGENEITY_KEY}{layer}"] = value
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
        bad.sort(key=lambda k: (HETEROGENEITY_KEY in k, k))
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
