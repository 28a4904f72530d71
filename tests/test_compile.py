"""Both models with MTO on under `torch.compile` (one graph, no break) and `torch.export` (outputs match eager).

SimMIM's eager forward runs its encoder in visible-first order, which needs the masked count on the host; traced,
it takes the mask-based path instead. Both must give the same outputs, which these tests also check.
"""

import pytest
import torch
from conftest import TINY_MAE, TINY_SIMMIM

from hf_mto import SimMIMMTOConfig, SimMIMMTOForMaskedImageModeling, ViTMAEMTOConfig, ViTMAEMTOForPreTraining

FIELDS = {
    "mae": ("loss", "logits", "mask", "sparsity_loss", "singularity_loss", "ranking_loss", "heterogeneity"),
    "simmim": ("loss", "reconstruction", "mask", "sparsity_loss", "singularity_loss", "ranking_loss", "heterogeneity"),
}


def _mae():
    torch.manual_seed(0)
    model = ViTMAEMTOForPreTraining(ViTMAEMTOConfig(**TINY_MAE, use_mto=True)).eval()
    generator = torch.Generator().manual_seed(0)
    inputs = {"pixel_values": torch.randn(3, 3, 32, 32, generator=generator)}
    inputs["noise"] = torch.rand(3, 64, generator=generator)
    return model, inputs


def _simmim():
    torch.manual_seed(0)
    model = SimMIMMTOForMaskedImageModeling(SimMIMMTOConfig(**TINY_SIMMIM, use_mto=True)).eval()
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(3, 3, 32, 32, generator=generator)
    mask = torch.stack([torch.randperm(64, generator=generator) < 38 for _ in range(3)])  # 38 masked in each
    return model, {"pixel_values": pixel_values, "bool_masked_pos": mask}


MODELS = {"mae": _mae, "simmim": _simmim}


def _assert_same_outputs(name, outputs, expected):
    for field in FIELDS[name]:
        torch.testing.assert_close(getattr(outputs, field), getattr(expected, field), msg=field)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_mto_forward_compiles_without_graph_break(name):
    model, inputs = MODELS[name]()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(**inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("name", sorted(MODELS))
def test_compiled_training_step_matches_eager(name):
    """`fullgraph=True` fails on any graph break; the traced path's values and gradients are the eager path's."""
    model, inputs = MODELS[name]()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    gradients = []
    for run in (model, compiled):
        model.zero_grad()
        outputs = run(**inputs)
        (outputs.loss + outputs.sparsity_loss + outputs.singularity_loss + outputs.ranking_loss).backward()
        gradients.append(
            {key: param.grad.clone() for key, param in model.named_parameters() if param.grad is not None}
        )
        if run is model:
            expected = outputs
    _assert_same_outputs(name, outputs, expected)
    assert gradients[0].keys() == gradients[1].keys()
    for key, grad in gradients[0].items():
        torch.testing.assert_close(gradients[1][key], grad, msg=key)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_mto_forward_exports_and_matches_eager(name):
    model, inputs = MODELS[name]()
    program = torch.export.export(model, args=(), kwargs=inputs)
    with torch.no_grad():
        expected = model(**inputs)
        outputs = program.module()(**inputs)
    _assert_same_outputs(name, outputs, expected)
