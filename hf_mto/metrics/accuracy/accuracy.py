"""Accuracy as an `evaluate` metric that loads offline from the installed package.

`evaluate.load("accuracy")` fetches its script from the Hugging Face Hub (the `evaluate` wheel ships no metric
scripts), so it fails on a machine without the Hub. This module has the same interface -- inputs `predictions` and
`references` (integer class indices), optional `normalize` and `sample_weight`, output `{"accuracy": ...}` -- and is
what `recipes/finetune.py` uses:

    >>> import evaluate
    >>> import hf_mto.metrics
    >>> accuracy = evaluate.load(hf_mto.metrics.ACCURACY_PATH)
    >>> accuracy.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2])
    {'accuracy': 0.75}

transformers' example scripts call `evaluate.load("accuracy")`; run from a directory holding an `accuracy/` folder
with this file (e.g. a link to `hf_mto/metrics/accuracy`) and `evaluate` loads it from there instead of the Hub.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
Accuracy: the fraction of predictions equal to their reference, (number correct) / (number of examples). With
`sample_weight`, the weighted fraction; with `normalize=False`, the (weighted) number of correct predictions.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class indices.
    references (`list` of `int`): true class indices.
    normalize (`bool`, defaults to `True`): return the fraction correct; `False` returns the (weighted) count.
    sample_weight (`list` of `float`, *optional*): one non-negative weight per example.

Returns:
    accuracy (`float`): in [0, 1] when normalized, else the (weighted) count of correct predictions.

Examples:
    >>> import evaluate
    >>> import hf_mto.metrics
    >>> accuracy = evaluate.load(hf_mto.metrics.ACCURACY_PATH)
    >>> accuracy.compute(predictions=[1, 0, 1], references=[1, 1, 1], sample_weight=[0.5, 0.25, 0.25])
    {'accuracy': 0.75}
"""


class Accuracy(evaluate.Metric):
    """Fraction of predictions equal to the reference."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        if len(predictions) == 0:
            raise ValueError("accuracy needs at least one prediction; got none.")
        correct = (predictions == references).astype(np.float64)
        weights = np.ones_like(correct) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        if weights.shape != correct.shape:
            raise ValueError(f"sample_weight must hold one weight per example ({len(correct)}); got {weights.shape}.")
        if np.any(weights < 0) or not np.all(np.isfinite(weights)):
            raise ValueError("sample_weight must be finite and non-negative.")
        total = float(np.sum(weights * correct))
        if not normalize:
            return {"accuracy": total}
        if weights.sum() == 0:
            raise ValueError("sample_weight sums to 0: accuracy is undefined.")
        return {"accuracy": total / float(weights.sum())}
