"""The keys under which `MTOTrainer` logs its metrics, shared by the trainer and by the readers of its log history
(the model card), so that neither has to import the other."""

from collections.abc import Sequence

# the models' output fields, logged under `mto_log_prefix` as mto/<name> (or mto/<stack>/<name>)
MTO_TERMS = ("sparsity_loss", "singularity_loss", "ranking_loss")
HETEROGENEITY_KEY = "heterogeneity/layer_"  # after a stack's prefix, + l: the batch-mean heterogeneity H^l


def mto_log_prefix(stack: str, stacks: Sequence[str]) -> str:
    """Where the MTO metrics of ``stack`` are logged: ``mto/`` for a method with one MTO stack (MAE's decoder,
    SimMIM's encoder), ``mto/<stack>/`` for each stack of a method with several (BootMAE's two decoders)."""
    return "mto/" if len(stacks) <= 1 else f"mto/{stack}/"


__all__ = ["HETEROGENEITY_KEY", "MTO_TERMS", "mto_log_prefix"]
