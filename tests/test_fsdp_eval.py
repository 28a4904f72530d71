"""Reconstruction pictures and the encoder's k-NN evaluation under FSDP2: two real processes (torchrun, gloo on
CPU), the model sharded by `fully_shard` as accelerate's FSDP version 2 does (accelerate enables FSDP on GPUs only)."""

import json
import textwrap
from pathlib import Path

import pytest
from test_distributed import torchrun

pytestmark = pytest.mark.slow

SCRIPT = """
import copy, json, types
import torch
from accelerate import PartialState
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import TrainerState
from conftest import TINY_MAE
from hf_mto import ViTMAEMTOConfig, ViTMAEMTOForPreTraining
from hf_mto.analysis import ReconstructionCallback
from hf_mto.evaluation import EncoderEvalCallback, unsharded_model
from hf_mto.training_args import MTOTrainingArguments

out = {out!r}
MTOTrainingArguments(output_dir=out, report_to="none")  # sets up the gloo group of torchrun's processes, as a run
state = PartialState()
rank = state.process_index
torch.manual_seed(0)
model = ViTMAEMTOForPreTraining(ViTMAEMTOConfig(**TINY_MAE))
reference = copy.deepcopy(model)  # the same model, never sharded, trained alike
for blocks in (model.vit.layers, model.decoder.decoder_layers):
    for block in blocks:
        fully_shard(block)
fully_shard(model)
assert all(isinstance(p, DTensor) for p in model.parameters())

# One step on both (the same batch on each process: FSDP's mean of the gradients is the reference's gradient), so
# the gathered weights must be the trained ones, not the initial ones.
generator = torch.Generator().manual_seed(1)
pixels = torch.randn(4, 3, 32, 32, generator=generator)
noise = torch.rand(4, 64, generator=generator)
for net in (model, reference):
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    net(pixel_values=pixels, noise=noise).loss.backward()
    optimizer.step()

def differences(copy):
    expected = reference.state_dict()
    return sorted(k for k, v in copy.state_dict().items() if not torch.allclose(v, expected[k], atol=1e-6))

rng = torch.get_rng_state()
everywhere = unsharded_model(model)
main_only = unsharded_model(model, main_process_only=True)
result = dict(
    rng_kept=torch.equal(rng, torch.get_rng_state()),
    every_class=type(everywhere).__name__,
    every_differences=differences(everywhere),
    main_only=None if main_only is None else differences(main_only),
    training=everywhere.training,
)

# The callbacks, as the Trainer calls them at an evaluation (on every process).
labelled = [dict(pixel_values=torch.randn(3, 32, 32, generator=generator), label=i % 3) for i in range(12)]
bank, queries = labelled[:8], labelled[8:]
metrics = dict(eval_runtime=1.0)
trainer_state = TrainerState(global_step=1)
trainer_state.is_world_process_zero = rank == 0
EncoderEvalCallback(bank, queries, pooling="mean", k=3, linear_probe=False).on_evaluate(
    None, trainer_state, None, model=model, metrics=metrics
)
reference_metrics = dict(eval_runtime=1.0)
EncoderEvalCallback(bank, queries, pooling="mean", k=3, linear_probe=False).on_evaluate(
    None, trainer_state, None, model=reference, metrics=reference_metrics
)
result.update(knn=metrics["eval_knn_accuracy"], reference_knn=reference_metrics["eval_knn_accuracy"])
for name, net in (("sharded", model), ("reference", reference)):
    args = types.SimpleNamespace(output_dir=f"{{out}}/{{name}}", report_to=[], masking=None, mask_patch_size=None)
    callback = ReconstructionCallback(pixels, [0.5] * 3, [0.5] * 3, num_images=2)
    callback.on_evaluate(args, trainer_state, None, model=net)
open(f"{{out}}/rank{{rank}}.json", "w").write(json.dumps(result))
state.destroy_process_group()
"""


def test_reconstructions_and_encoder_eval_run_on_the_gathered_weights_under_fsdp2(tmp_path):
    script = tmp_path / "fsdp_eval.py"
    script.write_text(textwrap.dedent(SCRIPT.format(out=str(tmp_path))))
    torchrun([str(script)], cwd=Path(__file__).parent)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for result in ranks:
        # a plain copy of the model's own class, holding the trained weights, in the model's mode (train)
        assert result["every_class"] == "ViTMAEMTOForPreTraining" and result["training"] is True
        assert result["every_differences"] == []
        assert result["rng_kept"]  # the copy's initialisation leaves the training's random draws as they were
        # the same accuracy as the unsharded model's, on every process
        assert result["knn"] == result["reference_knn"]
    assert ranks[0]["main_only"] == [] and ranks[1]["main_only"] is None  # gathered onto the main process only
    pictures = {name: tmp_path / name / "reconstructions" / "step-1.png" for name in ("sharded", "reference")}
    assert pictures["sharded"].read_bytes() == pictures["reference"].read_bytes()  # drawn once, from the same weights
    assert sorted(path.name for path in (tmp_path / "sharded" / "reconstructions").iterdir()) == ["step-1.png"]
