"""RAUC: relative area under the accuracy-vs-epoch curve (Eq. 8 of the MTO paper), as an `evaluate` metric.

    RAUC(S1, S2; E1, E2) = ∫_{E1}^{E2} (S2(E) − S1(E1)) dE / ∫_{E1}^{E2} (S1(E) − S1(E1)) dE

S1 is the baseline's score-vs-epoch curve and S2 the target method's (e.g. SimMIM and SimMIM + MTO). Both areas
are measured above the *baseline's* score at E1, so a target identical to the baseline scores exactly 1.0 and a
target that converges faster scores above 1. The paper's Table 2 reports (E1, E2) = (100, 400) and (200, 400).

Load it offline from the installed package and pass one pair of curves; each curve has its own epochs, so the two
methods may have been evaluated at different epochs:

    >>> import evaluate
    >>> import hf_mto.metrics
    >>> rauc = evaluate.load(hf_mto.metrics.RAUC_PATH)
    >>> rauc.compute(
    ...     baseline_epochs=[[100, 200, 300, 400]],
    ...     baseline_scores=[[80.0, 82.0, 83.0, 84.0]],
    ...     target_epochs=[[100, 250, 400]],
    ...     target_scores=[[81.0, 83.5, 84.5]],
    ...     e1=100,
    ...     e2=400,
    ... )
    {'rauc': 1.3392857142857142}

The inputs are `evaluate` features holding one *whole curve per example* (`Sequence(float64)`), so the outer list
is a batch of one. As a convenience, `compute()` also accepts the four curves as flat lists (or 1-D arrays) and
wraps them itself; `add(baseline_epochs=[...], ...)` takes flat curves natively, followed by `compute(e1=..., e2=...)`.
Exactly one (baseline, target) pair may be given per `compute()`.

Integration is trapezoidal over each curve's own evaluation epochs inside [E1, E2]. When E1 or E2 is not one of a
curve's epochs, its score there is linearly interpolated between the neighbouring evaluations (this is how S1(E1)
is obtained when the baseline was not evaluated at E1); a curve is never extrapolated, and each curve must have at
least two of its own evaluations inside [E1, E2].
"""

import warnings

import datasets
import evaluate
import numpy as np

_CITATION = """\
@article{choi2024emerging,
  title={Emerging Property of Masked Token for Effective Pre-training},
  author={Choi, Hyesong and Lee, Hunsang and Joung, Seyoung and Park, Hyejin and Kim, Jiyeong and Min, Dongbo},
  journal={arXiv preprint arXiv:2404.08330},
  year={2024}
}
"""

_DESCRIPTION = """\
RAUC (relative area under the curve, Eq. 8 of "Emerging Property of Masked Token for Effective Pre-training")
quantifies how much faster and better a target pre-training method converges than a baseline over an epoch interval
[E1, E2]: the area between the target's score curve S2 and the baseline's score at E1, divided by the area between
the baseline's own curve S1 and that same level S1(E1),

    RAUC = ∫_{E1}^{E2} (S2(E) − S1(E1)) dE / ∫_{E1}^{E2} (S1(E) − S1(E1)) dE.

Equal curves give exactly 1.0; RAUC = 1.47 means the target gained 47% more area than the baseline did over the
interval. Areas use the trapezoidal rule over each curve's evaluation epochs; scores at E1/E2 that fall between two
evaluations are linearly interpolated. The ratio is meaningful when the baseline improves over the interval
(positive denominator); a zero denominator is an error and a negative one raises a warning.
"""

_KWARGS_DESCRIPTION = """
Args:
    baseline_epochs (`list` of `list` of `float`): one curve: the epochs at which the baseline (S1) was evaluated,
        strictly increasing. A flat list is also accepted by `compute()`.
    baseline_scores (`list` of `list` of `float`): the baseline's scores (e.g. top-1 accuracy) at those epochs.
    target_epochs (`list` of `list` of `float`): the epochs at which the target method (S2) was evaluated; they
        need not match the baseline's.
    target_scores (`list` of `list` of `float`): the target's scores at those epochs.
    e1 (`float`): start of the integration interval, E1. Must lie within both curves' epoch ranges.
    e2 (`float`): end of the integration interval, E2 > E1. Must lie within both curves' epoch ranges.

Returns:
    rauc (`float`): RAUC(S1, S2; E1, E2). 1.0 when the target matches the baseline; above 1 when it converges faster.

Raises:
    ValueError: if e1/e2 are missing, non-finite or e1 >= e2; if a curve's epochs and scores differ in length, its
        epochs are not strictly increasing, contain non-finite values, do not cover [e1, e2], or fewer than 2 of its
        epochs lie inside [e1, e2]; if more or fewer than one pair of curves is given; or if the denominator is zero
        (the baseline is flat at S1(E1) over the interval).

Examples:
    >>> import evaluate
    >>> import hf_mto.metrics
    >>> rauc = evaluate.load(hf_mto.metrics.RAUC_PATH)
    >>> rauc.compute(
    ...     baseline_epochs=[[100, 200, 300, 400]],
    ...     baseline_scores=[[80.0, 82.0, 83.0, 84.0]],
    ...     target_epochs=[[100, 200, 300, 400]],
    ...     target_scores=[[81.0, 83.0, 84.0, 84.5]],
    ...     e1=100,
    ...     e2=400,
    ... )
    {'rauc': 1.3928571428571428}
"""

_CURVE_INPUTS = ("baseline_epochs", "baseline_scores", "target_epochs", "target_scores")


def _is_single_curve(values) -> bool:
    """True for a flat, non-empty sequence of numbers (one curve) rather than a batch of curves."""
    if values is None or isinstance(values, (str, bytes)):
        return False
    try:
        return len(values) > 0 and np.ndim(values[0]) == 0
    except (TypeError, ValueError):
        return False


def _check_curve(name: str, epochs, scores, e1: float, e2: float) -> tuple[np.ndarray, np.ndarray]:
    """Validate one curve against [e1, e2] and return it as float arrays."""
    epochs = np.asarray(epochs if epochs is not None else [], dtype=np.float64)
    scores = np.asarray(scores if scores is not None else [], dtype=np.float64)
    if len(epochs) != len(scores):
        raise ValueError(
            f"{name}_epochs and {name}_scores must have the same length; got {len(epochs)} epochs and "
            f"{len(scores)} scores."
        )
    if len(epochs) < 2:
        raise ValueError(f"The {name} curve needs at least 2 points; got {len(epochs)}.")
    if not (np.all(np.isfinite(epochs)) and np.all(np.isfinite(scores))):
        raise ValueError(
            f"The {name} curve contains missing or non-finite values: {name}_epochs={epochs.tolist()}, "
            f"{name}_scores={scores.tolist()}."
        )
    if np.any(np.diff(epochs) <= 0):
        raise ValueError(f"{name}_epochs must be strictly increasing; got {epochs.tolist()}.")
    first, last = epochs[0], epochs[-1]
    outside = [f"{key}={value:g}" for key, value in (("e1", e1), ("e2", e2)) if not first <= value <= last]
    if outside:
        verb = "lie" if len(outside) > 1 else "lies"
        raise ValueError(
            f"{' and '.join(outside)} {verb} outside the {name} curve's epoch range [{first:g}, {last:g}]; RAUC "
            "interpolates within a curve but does not extrapolate."
        )
    inside = int(np.count_nonzero((epochs >= e1) & (epochs <= e2)))
    if inside < 2:
        raise ValueError(
            f"The {name} curve has {inside} evaluation point(s) inside [e1, e2] = [{e1:g}, {e2:g}]; at least 2 "
            f"are needed to integrate it (its epochs: {epochs.tolist()})."
        )
    return epochs, scores


def _area_above(epochs: np.ndarray, scores: np.ndarray, level: float, e1: float, e2: float) -> float:
    """Trapezoidal ∫_{e1}^{e2} (S(E) − level) dE, with S linearly interpolated at e1 and e2."""
    interior = (epochs > e1) & (epochs < e2)
    x = np.concatenate(([e1], epochs[interior], [e2]))
    y = np.concatenate(([np.interp(e1, epochs, scores)], scores[interior], [np.interp(e2, epochs, scores)])) - level
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RAUC(evaluate.Metric):
    """Relative area under the score-vs-epoch curve of a target method against a baseline (MTO paper, Eq. 8)."""

    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({name: datasets.Sequence(datasets.Value("float64")) for name in _CURVE_INPUTS}),
            reference_urls=["https://arxiv.org/abs/2404.08330"],
        )

    def compute(self, **kwargs):
        """As `evaluate.Metric.compute`, but also accepts the four curves as flat lists (one pair, wrapped here)."""
        if all(_is_single_curve(kwargs.get(name)) for name in _CURVE_INPUTS):
            kwargs.update({name: [kwargs[name]] for name in _CURVE_INPUTS})
        return super().compute(**kwargs)

    def _compute(self, baseline_epochs, baseline_scores, target_epochs, target_scores, e1=None, e2=None):
        if len(baseline_epochs) != 1:
            raise ValueError(
                "RAUC compares exactly one (baseline, target) pair of curves per compute(); got "
                f"{len(baseline_epochs)}. Pass each curve as a list of floats wrapped in a batch of one, e.g. "
                "baseline_epochs=[[100, 200, 300]]."
            )
        if e1 is None or e2 is None:
            raise ValueError(
                f"e1 and e2 (the epoch interval [E1, E2]) are required, e.g. e1=100, e2=400; got e1={e1}, e2={e2}."
            )
        e1, e2 = float(e1), float(e2)
        if not (np.isfinite(e1) and np.isfinite(e2)):
            raise ValueError(f"e1 and e2 must be finite; got e1={e1:g}, e2={e2:g}.")
        if e1 >= e2:
            raise ValueError(f"e1 must be smaller than e2; got e1={e1:g}, e2={e2:g}.")

        base_x, base_y = _check_curve("baseline", baseline_epochs[0], baseline_scores[0], e1, e2)
        target_x, target_y = _check_curve("target", target_epochs[0], target_scores[0], e1, e2)

        s1_e1 = float(np.interp(e1, base_x, base_y))
        denominator = _area_above(base_x, base_y, s1_e1, e1, e2)
        numerator = _area_above(target_x, target_y, s1_e1, e1, e2)
        scale = (e2 - e1) * max(1.0, abs(s1_e1))
        if abs(denominator) <= 1e-12 * scale:
            raise ValueError(
                f"RAUC is undefined for [e1, e2] = [{e1:g}, {e2:g}]: the denominator, the baseline's area above "
                f"S1(E1), is zero, i.e. the baseline is flat at S1(E1) = {s1_e1:g} over the interval."
            )
        if denominator < 0:
            warnings.warn(
                f"The baseline's area above S1(E1) = {s1_e1:g} over [{e1:g}, {e2:g}] is negative ({denominator:g}): "
                "the baseline got worse over the interval, so the RAUC ratio's sign and size are hard to interpret.",
                stacklevel=2,
            )
        return {"rauc": numerator / denominator}
