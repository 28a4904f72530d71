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
    # the scripts import conftest's tiny config, and this checkout's hf_mto (not another installed one)
    paths = [str(Path(__file__).parent), str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in paths if path)}
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
            from hf_mto import BeitMTOConfig, BeitMTOForMaskedImageModeling, ViTMAEMTOConfig, ViTMAEMTOForPreTraining
            from hf_mto.trainer import MTOTrainer
            from hf_mto.training_args import MTOTrainingArguments

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
    # lr = 1.5e-3 (the preset's base lr) x (16 x 2) / 256 at its peak; warm-up then cosine keep every logged value
    # at or below it
    assert 0 < first["learning_rate"] <= 1.5e-3 * 32 / 256 + 1e-12


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


@pytest.mark.parametrize("model_type", ["beit", "conmim", "mae", "simmim"])
def test_processes_end_with_identical_weights_and_share_the_gathered_mto_logs(tmp_path, model_type):
    """Each process masks its own shard (evolved masks from the model's own attention, MTO on); DDP must still
    leave both with the same weights (ConMIM: its momentum encoder too), and the logged MTO terms must be the means
    over both processes."""
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, torch
            from conftest import TINY_MAE, TINY_SIMMIM, TINY_VIT
            from hf_mto import ConMIMMTOConfig, ConMIMMTOForPreTraining
            from hf_mto import SimMIMMTOConfig, SimMIMMTOForMaskedImageModeling
            from hf_mto import BeitMTOConfig, BeitMTOForMaskedImageModeling, ViTMAEMTOConfig, ViTMAEMTOForPreTraining
            from hf_mto.trainer import MTOTrainer
            from hf_mto.training_args import MTOTrainingArguments

            torch.manual_seed(0)
            if {model_type!r} == "mae":
                model = ViTMAEMTOForPreTraining(ViTMAEMTOConfig(**TINY_MAE))
            elif {model_type!r} == "beit":  # k-means tokenizer: fitted by the main process, loaded by the other
                model = BeitMTOForMaskedImageModeling(BeitMTOConfig(
                    **TINY_SIMMIM, vocab_size=64, tokenizer_type="kmeans", tokenizer_image_size=32, mask_ratio=0.5))
            elif {model_type!r} == "conmim":
                config = ConMIMMTOConfig(**TINY_VIT, projector_hidden_size=48, projector_size=16, mask_ratio=0.5)
                model = ConMIMMTOForPreTraining(config)
            else:
                model = SimMIMMTOForMaskedImageModeling(SimMIMMTOConfig(**TINY_SIMMIM, mask_ratio=0.5))
            initial = {{k: v.clone() for k, v in model.state_dict().items()}}
            # different images on each process (the sampler shards them), 4 per process per step
            images = [{{"pixel_values": torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(i))}}
                      for i in range(32)]
            if {model_type!r} == "beit":  # its tokenizer's view: here the same pixels
                images = [{{**image, "tokenizer_pixel_values": image["pixel_values"]}} for image in images]
            args = MTOTrainingArguments(
                output_dir={str(tmp_path)!r}, report_to="none", masking="evolved", per_device_train_batch_size=4,
                max_steps=4, logging_steps=1, save_strategy="no", num_train_epochs=2, mask_patch_size=8,
            )
            trainer = MTOTrainer(model=model, args=args, train_dataset=images)
            trainer.train()
            rank = args.process_index
            torch.save(trainer.model.state_dict(), {str(tmp_path)!r} + f"/weights{{rank}}.pt")
            if {model_type!r} == "beit":  # the tokenizer makes the targets: each process must have the same one
                torch.save(model.image_tokenizer.codebook, {str(tmp_path)!r} + f"/codebook{{rank}}.pt")
            logs = [e for e in trainer.state.log_history if "mto/ranking_loss" in e]
            record = {{"world": args.world_size, "logs": logs, "changed": [
                k for k, v in trainer.model.state_dict().items() if not torch.equal(v, initial[k])]}}
            open({str(tmp_path)!r} + f"/rank{{rank}}.json", "w").write(json.dumps(record))
            trainer.accelerator.end_training()
            """
        )
    )
    torchrun([str(script)], cwd=Path(__file__).parent)
    import torch

    weights = [torch.load(tmp_path / f"weights{rank}.pt") for rank in (0, 1)]
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert records[0]["world"] == 2 and records[0]["changed"]  # a real two-process run that trained
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        if "running_" in key:
            continue  # ConMIM's BatchNorm statistics: each process's own batches, as the official code's (plain BN)
        assert torch.equal(weights[0][key], weights[1][key]), key
    if model_type == "conmim":  # the momentum encoder followed the (averaged) student on both processes
        assert "teacher.beit.layers.0.mlp.fc1.weight" in records[0]["changed"]
    if model_type == "beit":  # one fit (the main process's), which the other process loaded from its cache
        codebooks = [torch.load(tmp_path / f"codebook{rank}.pt") for rank in (0, 1)]
        assert codebooks[0].abs().sum() > 0 and torch.equal(codebooks[0], codebooks[1])
    # the logs are gathered: every process logs the same means although each saw different images
    assert len(records[0]["logs"]) == 4 and records[0]["logs"] == records[1]["logs"]
