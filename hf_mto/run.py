"""The run plumbing every training recipe shares: logging set-up, training with automatic resume, evaluation, and a
clean end of the process group. The recipes in `recipes/` are argument parsing, building, and these calls."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import transformers
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

logger = logging.getLogger(__name__)


def setup_run(training_args: TrainingArguments, *loggers: logging.Logger) -> None:
    """Log to stdout at the process's level (the main process INFO, the others WARNING, as the Trainer's own
    `get_process_log_level`), for transformers, hf_mto and ``loggers``; seed everything with ``training_args.seed``."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    for each in (logger, *loggers):
        each.setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.set_seed(training_args.seed)


def resume_checkpoint(training_args: TrainingArguments) -> str | None:
    """`--resume_from_checkpoint`, else the last `checkpoint-*` in `output_dir` when there is one: rerunning a
    killed command continues it instead of starting over."""
    resume = training_args.resume_from_checkpoint
    if resume is None and training_args.output_dir and Path(training_args.output_dir).is_dir():
        resume = get_last_checkpoint(training_args.output_dir)
        if resume is not None:
            logger.info("resuming from the last checkpoint in the output directory: %s", resume)
    return resume


def check_resumable(checkpoint: str, model_type: str, training_args: TrainingArguments) -> None:
    """Stop before resuming a model of `model_type` from a checkpoint of another model type, naming what the
    checkpoint holds and how to start fresh: loading it would fail on the first mismatched weight, with transformers'
    message naming neither model.

    Raises:
        ValueError: the checkpoint's `config.json` names another model type.
    """
    config_file = Path(checkpoint) / "config.json"
    if not config_file.is_file():  # FSDP and DeepSpeed checkpoints: the Trainer's own loading speaks for them
        return
    saved = json.loads(config_file.read_text())
    if saved.get("model_type", model_type) == model_type:
        return
    held = f"{', '.join(saved.get('architectures') or ['a model'])} (model_type {saved['model_type']!r})"
    if training_args.resume_from_checkpoint is None:  # found in output_dir: rerunning would resume it
        where = f"--output_dir {training_args.output_dir!r} holds {checkpoint!r}"
        fresh = f"train into another --output_dir, or delete {training_args.output_dir!r} to start over there"
    else:
        where = f"--resume_from_checkpoint {checkpoint!r} is"
        fresh = f"name a checkpoint of {model_type!r}, or leave --resume_from_checkpoint out"
    raise ValueError(f"{where}, a checkpoint of {held}, which this run of {model_type!r} cannot resume: {fresh}.")


def train(trainer: Trainer) -> None:
    """Train (resuming as `resume_checkpoint` says, from a checkpoint of the same model type), save the model, and
    log and save the train metrics and state."""
    resume = resume_checkpoint(trainer.args)
    if resume is not None:
        check_resumable(resume, trainer.model.config.model_type, trainer.args)
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()


def evaluate(trainer: Trainer) -> dict[str, float]:
    """Evaluate, log and save the metrics; returns them."""
    metrics = trainer.evaluate()
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    return metrics


def finish(trainer: Trainer) -> None:
    """Let every process arrive, then tear the process group down before the interpreter exits.

    A gloo group left alive can abort a process (SIGABRT, "terminate called without an active exception") after all
    the work is done, and one process tearing down while the main process is still writing its model card aborted
    the same way.
    """
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


__all__ = ["check_resumable", "evaluate", "finish", "resume_checkpoint", "setup_run", "train"]
