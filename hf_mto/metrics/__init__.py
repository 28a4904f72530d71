"""`evaluate` metric modules shipped with hf_mto.

Each metric lives in its own folder holding a script of the same name (the layout `evaluate.load` expects for a
local directory), so it loads offline from the installed package:

    >>> import evaluate
    >>> import hf_mto.metrics
    >>> rauc = evaluate.load(hf_mto.metrics.RAUC_PATH)
    >>> accuracy = evaluate.load(hf_mto.metrics.ACCURACY_PATH)
"""

from pathlib import Path

RAUC_PATH = str(Path(__file__).parent / "rauc")
"""Directory of the RAUC metric (Eq. 8 of the MTO paper); pass it to `evaluate.load`."""

ACCURACY_PATH = str(Path(__file__).parent / "accuracy")
"""Directory of the accuracy metric (the interface of the Hub's `accuracy`, which `evaluate` cannot load offline)."""

__all__ = ["ACCURACY_PATH", "RAUC_PATH"]
