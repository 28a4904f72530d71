"""RAUC metric (Eq. 8 of the MTO paper) loaded through `evaluate.load(hf_mto.metrics.RAUC_PATH)`, checked against
values worked by hand with the trapezoidal rule."""

import os
import warnings

os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")  # a local path never needs the Hub; make sure it is not tried

import evaluate
import numpy as np
import pytest

import hf_mto.metrics

# Shared curves. Baseline S1 and target S2 evaluated every 100 epochs.
BASE_E = [100, 200, 300, 400]
BASE_S = [80.0, 82.0, 83.0, 84.0]
TARGET_E = [100, 200, 300, 400]
TARGET_S = [81.0, 83.0, 84.0, 84.5]


@pytest.fixture(scope="module")
def rauc():
    return evaluate.load(hf_mto.metrics.RAUC_PATH, keep_in_memory=True)


def compute(metric, base_e=BASE_E, base_s=BASE_S, target_e=TARGET_E, target_s=TARGET_S, **kwargs):
    """The documented call shape: each curve is one example (a list), so the inputs are batches of one."""
    return metric.compute(
        baseline_epochs=[base_e],
        baseline_scores=[base_s],
        target_epochs=[target_e],
        target_scores=[target_s],
        **kwargs,
    )


def test_rauc_path_points_at_script_named_like_its_folder():
    assert os.path.isfile(os.path.join(hf_mto.metrics.RAUC_PATH, "rauc.py"))


def test_loaded_module_describes_itself(rauc):
    assert "2404.08330" in rauc.citation and "Emerging Property of Masked Token" in rauc.citation
    assert "relative area under the curve" in rauc.description.lower()
    assert sorted(rauc.features) == ["baseline_epochs", "baseline_scores", "target_epochs", "target_scores"]


def test_hand_worked_100_400(rauc):
    # S1(E1) = S1(100) = 80; step 100.
    # denominator: S1 - 80 = [0, 2, 3, 4] -> 100 * ((0+2)/2 + (2+3)/2 + (3+4)/2) = 100 * (1 + 2.5 + 3.5) = 700
    # numerator:   S2 - 80 = [1, 3, 4, 4.5] -> 100 * ((1+3)/2 + (3+4)/2 + (4+4.5)/2) = 100 * (2 + 3.5 + 4.25) = 975
    # RAUC = 975 / 700 = 39/28
    result = compute(rauc, e1=100, e2=400)
    assert set(result) == {"rauc"} and isinstance(result["rauc"], float)
    assert result["rauc"] == pytest.approx(39 / 28, rel=1e-12)


def test_hand_worked_200_400(rauc):
    # S1(E1) = S1(200) = 82.
    # denominator: S1 - 82 on [200, 300, 400] = [0, 1, 2] -> 100 * (0.5 + 1.5) = 200
    # numerator:   S2 - 82 on [200, 300, 400] = [1, 2, 2.5] -> 100 * (1.5 + 2.25) = 375
    # RAUC = 375 / 200 = 1.875
    assert compute(rauc, e1=200, e2=400)["rauc"] == pytest.approx(1.875, rel=1e-12)


def test_equal_curves_give_exactly_one(rauc):
    scores = [0.1, 0.37, 0.52, 0.61, 0.655]
    epochs = [0, 100, 250, 300, 400]
    for e1, e2 in [(100, 400), (0, 400), (130, 370)]:
        assert compute(rauc, epochs, scores, epochs, scores, e1=e1, e2=e2)["rauc"] == 1.0


def test_different_epoch_grids(rauc):
    # Baseline as above (denominator over [100, 400] = 700); target evaluated at [100, 250, 400] only.
    # numerator: S2 - 80 = [1, 3.5, 4.5], step 150 -> 150 * ((1+3.5)/2 + (3.5+4.5)/2) = 150 * (2.25 + 4) = 937.5
    # RAUC = 937.5 / 700 = 75/56
    result = compute(rauc, target_e=[100, 250, 400], target_s=[81.0, 83.5, 84.5], e1=100, e2=400)
    assert result["rauc"] == pytest.approx(75 / 56, rel=1e-12)


def test_interpolated_e1(rauc):
    # E1 = 150 lies between evaluations: S1(150) = (80 + 82)/2 = 81, S2(150) = (81 + 83)/2 = 82.
    # denominator: S1 - 81 on [150, 200, 300, 400] = [0, 1, 2, 3]
    #   -> 50*(0+1)/2 + 100*(1+2)/2 + 100*(2+3)/2 = 25 + 150 + 250 = 425
    # numerator:   S2 - 81 on [150, 200, 300, 400] = [1, 2, 3, 3.5]
    #   -> 50*(1+2)/2 + 100*(2+3)/2 + 100*(3+3.5)/2 = 75 + 250 + 325 = 650
    # RAUC = 650 / 425 = 26/17
    assert compute(rauc, e1=150, e2=400)["rauc"] == pytest.approx(26 / 17, rel=1e-12)


def test_interpolated_e2_on_different_grids(rauc):
    # E2 = 350. Baseline: S1(100) = 80, S1(350) = (83 + 84)/2 = 83.5.
    # denominator: S1 - 80 on [100, 200, 300, 350] = [0, 2, 3, 3.5]
    #   -> 100*(0+2)/2 + 100*(2+3)/2 + 50*(3+3.5)/2 = 100 + 250 + 162.5 = 512.5
    # Target on [100, 250, 400] = [81, 83.5, 84.5]: S2(350) = 83.5 + (100/150) * 1 = 84 + 1/6.
    # numerator: S2 - 80 on [100, 250, 350] = [1, 3.5, 4 + 1/6]
    #   -> 150*(1+3.5)/2 + 100*(3.5 + 4 + 1/6)/2 = 337.5 + 383 + 1/3 = 720 + 5/6 = 4325/6
    # RAUC = (4325/6) / 512.5 = 4325 / 3075 = 173/123
    result = compute(rauc, target_e=[100, 250, 400], target_s=[81.0, 83.5, 84.5], e1=100, e2=350)
    assert result["rauc"] == pytest.approx(173 / 123, rel=1e-12)


def test_flat_curves_numpy_and_add_are_accepted(rauc):
    expected = 39 / 28  # same curves as test_hand_worked_100_400
    flat = rauc.compute(
        baseline_epochs=BASE_E,
        baseline_scores=np.array(BASE_S),
        target_epochs=TARGET_E,
        target_scores=TARGET_S,
        e1=100,
        e2=400,
    )
    assert flat["rauc"] == pytest.approx(expected, rel=1e-12)
    rauc.add(baseline_epochs=BASE_E, baseline_scores=BASE_S, target_epochs=TARGET_E, target_scores=TARGET_S)
    assert rauc.compute(e1=100, e2=400)["rauc"] == pytest.approx(expected, rel=1e-12)


def test_negative_baseline_area_warns(rauc):
    # Baseline drops: S1 - 84 on [100, 200] = [0, -2] -> denominator -100; target S2 - 84 = [0, 2] -> 100; RAUC = -1
    with pytest.warns(UserWarning, match="negative"):
        result = compute(rauc, [100, 200], [84.0, 82.0], [100, 200], [84.0, 86.0], e1=100, e2=200)
    assert result["rauc"] == pytest.approx(-1.0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(base_s=[80.0, 82.0, 83.0]),
            r"baseline_epochs and baseline_scores must have the same length; got 4 epochs and 3 scores",
        ),
        (
            dict(target_e=[100, 200, 400]),
            r"target_epochs and target_scores must have the same length; got 3 epochs and 4 scores",
        ),
        (dict(base_e=[100, 300, 200, 400]), r"baseline_epochs must be strictly increasing"),
        (dict(target_e=[100, 200, 200, 400]), r"target_epochs must be strictly increasing"),
        (dict(e1=400, e2=100), r"e1 must be smaller than e2; got e1=400, e2=100"),
        (dict(e1=200, e2=200), r"e1 must be smaller than e2; got e1=200, e2=200"),
        (dict(e1=50), r"e1=50 lies outside the baseline curve's epoch range \[100, 400\]"),
        (dict(e2=500), r"e2=500 lies outside the baseline curve's epoch range \[100, 400\]"),
        (
            dict(target_e=[150, 200, 300, 400], e1=100),
            r"e1=100 lies outside the target curve's epoch range \[150, 400\]",
        ),
        # [150, 250] holds only epoch 200 of the baseline (the baseline is checked first)
        (
            dict(e1=150, e2=250),
            r"baseline curve has 1 evaluation point\(s\) inside \[e1, e2\] = \[150, 250\]; at least 2",
        ),
        (dict(base_e=[100, 400], base_s=[80.0, 84.0], e1=150, e2=350), r"baseline curve has 0 evaluation point\(s\)"),
        (dict(target_e=[100, 400], target_s=[81.0, 84.5], e1=200), r"target curve has 1 evaluation point\(s\)"),
        (
            dict(base_s=[80.0, 80.0, 80.0, 80.0]),
            r"denominator, .* is zero, i\.e\. the baseline is flat at S1\(E1\) = 80",
        ),
        (dict(base_s=[80.0, 82.0, 80.0, 80.0], e1=300), r"baseline is flat at S1\(E1\) = 80 over the interval"),
        (dict(e1=None), r"e1 and e2 .* are required"),
        (dict(e1=450, e2=500), r"e1=450 and e2=500 lie outside the baseline curve's epoch range"),
        (dict(base_s=[80.0, float("nan"), 83.0, 84.0]), r"baseline curve contains missing or non-finite values"),
    ],
)
def test_value_errors(rauc, overrides, message):
    overrides = dict(overrides)  # the parametrized dict is shared; do not consume it
    kwargs = dict(e1=100, e2=400)
    curves = {k: overrides.pop(k) for k in list(overrides) if k.startswith(("base_", "target_"))}
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=message):
        compute(rauc, **curves, **kwargs)


def test_more_than_one_pair_is_rejected(rauc):
    with pytest.raises(ValueError, match=r"exactly one \(baseline, target\) pair of curves per compute\(\); got 2"):
        rauc.compute(
            baseline_epochs=[BASE_E, BASE_E],
            baseline_scores=[BASE_S, BASE_S],
            target_epochs=[TARGET_E, TARGET_E],
            target_scores=[TARGET_S, TARGET_S],
            e1=100,
            e2=400,
        )


def test_metric_is_reusable_after_an_error(rauc):
    with pytest.raises(ValueError):
        compute(rauc, e1=400, e2=100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compute(rauc, e1=100, e2=400)["rauc"] == pytest.approx(39 / 28, rel=1e-12)
