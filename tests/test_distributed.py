"""Two real processes (torchrun, gloo on CPU): sharded data, the lr rule over processes, metrics gathered."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_recipe_pretrain import FASHION_MNIST, PRESET, ROOT, TINY_FLAGS

pytestmark = pytest.mark.slow


def torchrun(args, cwd, timeout=600):
    # --standalone: a local rendezvous on a free port, so parallel test runs never collide
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}  # the scripts import conftest's tiny config
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_logged_metrics_are_averaged_over_steps_and_processes(tmp_path):
    script = tmp_path / "gather.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, torch
            from conftest import TINY_MAE
            from hf_mto import ViTMAEMTOConfig, ViTMAEMTOForPreTraining
            from hf_mto.trainer import MTOTrainer, MTOTrainingArguments

            args = MTOTrainingArguments(output_dir={str(tmp_path)!r}, report_to="none")
            trainer = MTOTrainer(model=ViTMAEMTOForPreTraining(ViTMAEMTOConfig(**TINY_MAE)), args=args)
            rank = args.process_index
            trainer.model.train()
            # rank 0 records 1 and 3 (mean 2), rank 1 records 2 and 4 (mean 3): the logged value must be 2.5
            trainer._record({{"reconstruction_loss": torch.tensor(1.0 + rank)}})
            trainer._record({{"reconstruction_loss": torch.tensor(3.0 + rank)}})
            logs = {{"loss": 0.0}}
            trainer.log(logs)
            result = {{"world": args.world_size, "value": logs["reconstruction_loss"]}}
            open({str(tmp_path)!r} + f"/rank{{rank}}.json", "w").write(json.dumps(result))
            trainer.accelerator.end_training()  # destroy the gloo group before exit, as the recipe does
            """
        )
    )
    torchrun([str(script)], cwd=Path(__file__).parent)
    lines = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(line == {"world": 2, "value": 2.5} for line in lines)


@pytest.mark.skipif(not FASHION_MNIST.exists(), reason="needs Debian's dataset-fashion-mnist")
def test_pretrain_recipe_with_two_processes_shards_the_data(tmp_path):
    out = tmp_path / "run"
    torchrun(
        [str(ROOT / "recipes" / "pretrain.py"), "--config", str(PRESET), *TINY_FLAGS, "--output_dir", str(out)],
        tmp_path,
    )
    state = json.loads((out / "trainer_state.json").read_text())
    # 96 images, 16 per process, 2 processes: 3 optimizer steps (one process alone would take 6)
    assert state["global_step"] == 3
    first = next(entry for entry in state["log_history"] if "learning_rate" in entry)
    assert "mto/ranking_loss" in first
    # lr = 1.5e-4 x (16 x 2) / 256 at its peak; warm-up then cosine keep every logged value at or below it
    assert 0 < first["learning_rate"] <= 1.5e-4 * 32 / 256 + 1e-12


@pytest.mark.skipif(not FASHION_MNIST.exists(), reason="needs Debian's dataset-fashion-mnist")
def test_simmim_with_mto_and_evolved_masking_on_two_processes(tmp_path):
    out = tmp_path / "run"
    preset = ROOT / "recipes" / "configs" / "tiny_cpu_simmim_mto.yaml"
    overrides = "image_size=32,patch_size=4,encoder_stride=4,hidden_size=32,num_hidden_layers=2,num_attention_heads=4"
    flags = ["--config_overrides", overrides]
    flags += TINY_FLAGS[2:] + ["--masking", "evolved", "--num_train_epochs", "2"]
    torchrun(
        [str(ROOT / "recipes" / "pretrain.py"), "--config", str(preset), *flags, "--output_dir", str(out)], tmp_path
    )
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 6  # 96 images / (16 x 2 processes) x 2 epochs
    logged = [entry for entry in state["log_history"] if "evolved/depth" in entry]
    assert logged and logged[-1]["evolved/depth"] > 0  # the second epoch cuts the trees below the leaves
    assert all("mto/ranking_loss" in entry for entry in logged)
