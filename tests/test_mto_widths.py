"""DESIGN.md's criterion for the default affinity, at the ViT-B preset widths (MAE decoder 512-d, SimMIM 768-d).

Tiny test widths (D <= 64) hide what the raw dot product does at real widths: it saturates the softmax, so L_spa
vanishes with zero gradient and H^0 collapses. These tests build each ViT-B preset's model the way
`recipes/pretrain.py` does, mask a batch the way the trainer does with the preset's masking, and check at
initialisation that every MTO term is finite, that L_spa and L_r do not vanish (value and gradient norm >= 1e-3),
and that H^0 >= 10% of log(number of visible tokens).
"""

import math
from pathlib import Path

import pytest
import torch

from hf_mto.cli import ModelArguments, build_config, build_model, parse_args
from hf_mto.data import DataArguments
from hf_mto.evaluation import EncoderEvalArguments
from hf_mto.mto import mean_heterogeneity
from hf_mto.trainer import MTOTrainer
from hf_mto.training_args import MTOTrainingArguments

pytestmark = pytest.mark.slow  # a ViT-B built, run and differentiated three times per affinity: ~20 s a preset

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs"
VIT_B_PRESETS = {"mae": CONFIGS / "vit_base_mae_mto_in1k.yaml", "simmim": CONFIGS / "vit_base_simmim_mto_in1k.yaml"}
MIN_TERM = 1e-3  # L_spa and L_r: value and gradient norm
MIN_H0_FRACTION = 0.1  # of log(number of visible tokens)


def preset_model_and_inputs(preset: Path, output_dir: Path) -> tuple[torch.nn.Module, dict]:
    """The preset's model at initialisation and the trainer's inputs for a batch of 2 random 224 px images, masked
    with the preset's (default) masking: MAE random 75% (drawn by the model), SimMIM 32 px blocks, ratio 0.6."""
    argument_types = (ModelArguments, DataArguments, EncoderEvalArguments, MTOTrainingArguments)
    # bf16 off: the criterion is about the MTO math at initialisation, which runs in float32 whatever the autocast;
    # no evaluation: the trainer is only asked for masks.
    flags = ["--config", str(preset), "--output_dir", str(output_dir), "--use_cpu", "true", "--bf16", "false"]
    flags += ["--eval_strategy", "no"]
    model_args, _, _, training_args = parse_args(argument_types, flags)
    torch.manual_seed(0)
    model = build_model(model_args, build_config(model_args))
    pixel_values = torch.randn(2, 3, 224, 224)
    inputs = MTOTrainer(model=model, args=training_args)._with_masks(model, {"pixel_values": pixel_values})
    return model, inputs


def measure(model, inputs: dict) -> dict:
    """Every MTO term of one forward pass, the gradient norm of each loss w.r.t. the model's parameters, and the
    number of visible tokens per image."""
    outputs = model(**inputs, use_mto=True)
    parameters = [p for p in model.parameters() if p.requires_grad]
    heterogeneity = mean_heterogeneity(outputs.heterogeneity, outputs.mask)  # H^0..H^L, batch means
    measured = {"H": heterogeneity.tolist(), "num_visible": int((~outputs.mask.bool()).sum(dim=1).min())}
    for name, key in (("sparsity_loss", "L_spa"), ("singularity_loss", "L_e"), ("ranking_loss", "L_r")):
        value = getattr(outputs, name)
        grads = torch.autograd.grad(value, parameters, retain_graph=True, allow_unused=True)
        measured[key] = value.item()
        measured[f"|grad {key}|"] = torch.sqrt(sum(g.float().pow(2).sum() for g in grads if g is not None)).item()
    return measured


def criterion_failures(measured: dict) -> list[str]:
    """The parts of DESIGN.md's criterion that `measured` misses; empty when it is met."""
    failures = [f"{key} not finite" for key, value in measured.items() if key != "H" and not math.isfinite(value)]
    failures += ["H not finite"] if not all(math.isfinite(h) for h in measured["H"]) else []
    for key in ("L_spa", "L_r"):
        if not measured[key] >= MIN_TERM:
            failures.append(f"{key} = {measured[key]:.3g} < {MIN_TERM}")
        if not measured[f"|grad {key}|"] >= MIN_TERM:
            failures.append(f"|grad {key}| = {measured[f'|grad {key}|']:.3g} < {MIN_TERM}")
    floor = MIN_H0_FRACTION * math.log(measured["num_visible"])
    if not measured["H"][0] >= floor:
        failures.append(f"H^0 = {measured['H'][0]:.3g} < {floor:.3g}")
    return failures


@pytest.mark.parametrize("method", sorted(VIT_B_PRESETS))
def test_default_affinity_meets_the_criterion_at_vit_b_width_and_dot_does_not(method, tmp_path):
    model, inputs = preset_model_and_inputs(VIT_B_PRESETS[method], tmp_path)
    assert model.config.mto_affinity == "cosine"  # the preset leaves the affinity to the config default

    measured = {"cosine": measure(model, inputs)}
    for affinity in ("scaled", "dot"):
        model.config.mto_affinity = affinity  # same weights, same mask
        measured[affinity] = measure(model, inputs)
    for affinity, values in measured.items():
        print(f"{method} {affinity}: {values}")  # the numbers README and docs/RESULTS.md quote

    assert criterion_failures(measured["cosine"]) == [], measured["cosine"]
    assert criterion_failures(measured["scaled"]) == [], measured["scaled"]  # the option ruled out by its sink
    # The raw dot product saturates the softmax: every visible token puts all its mass on itself, so L_spa is ~0
    # with no gradient. A regression of the default to "dot" fails here.
    failures = criterion_failures(measured["dot"])
    assert any(failure.startswith("L_spa =") for failure in failures), measured["dot"]
    assert any(failure.startswith("|grad L_spa|") for failure in failures), measured["dot"]
