"""recipes/pretrain.py end to end, as a user runs it: a subprocess on the embedded default data."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoImageProcessor, AutoModelForMaskedImageModeling, AutoModelForPreTraining

import hf_mto  # noqa: F401  (registers the Auto classes)
from hf_mto.cli import ModelArguments, build_config, build_model, parse_args
from hf_mto.data import DataArguments
from hf_mto.evaluation import EncoderEvalArguments
from hf_mto.methods import method_for, model_types
from hf_mto.training_args import MTOTrainingArguments

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
import pretrain  # noqa: E402

PRETRAIN_ARGS = (ModelArguments, DataArguments, EncoderEvalArguments, MTOTrainingArguments)
PRESET = ROOT / "recipes" / "configs" / "tiny_cpu_mae_mto.yaml"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")

TINY_FLAGS = [
    "--config_overrides",
    "image_size=32,patch_size=4,hidden_size=32,num_hidden_layers=2,num_attention_heads=4,intermediate_size=64,"
    "decoder_hidden_size=32,decoder_num_hidden_layers=2,decoder_num_attention_heads=4,decoder_intermediate_size=64",
    "--max_train_samples",
    "96",
    "--max_eval_samples",
    "32",
    "--per_device_train_batch_size",
    "16",
    "--per_device_eval_batch_size",
    "16",
    "--num_train_epochs",
    "1",
    "--logging_steps",
    "2",
    "--dataloader_num_workers",
    "0",
    "--report_to",
    "none",
]


@pytest.mark.skipif(not FASHION_MNIST.exists(), reason="needs Debian's dataset-fashion-mnist")
def test_simmim_recipe_runs_with_block_masks(tmp_path):
    out = tmp_path / "run"
    preset = ROOT / "recipes" / "configs" / "tiny_cpu_simmim_mto.yaml"
    flags = [f.replace("decoder_", "unused_") for f in TINY_FLAGS]  # same flags, encoder-only overrides below
    flags[1] = "image_size=32,patch_size=4,encoder_stride=4,hidden_size=32,num_hidden_layers=2,num_attention_heads=4"
    cmd = [sys.executable, str(ROOT / "recipes" / "pretrain.py"), "--config", str(preset), *flags]
    result = subprocess.run(
        cmd + ["--output_dir", str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert "mto/heterogeneity/layer_2" in next(e for e in state["log_history"] if "reconstruction_loss" in e)
    model = AutoModelForMaskedImageModeling.from_pretrained(out)
    assert isinstance(model, hf_mto.SimMIMMTOForMaskedImageModeling)


@pytest.mark.skipif(not FASHION_MNIST.exists(), reason="needs Debian's dataset-fashion-mnist")
def test_pretrain_recipe_runs_and_leaves_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "recipes" / "pretrain.py"), "--config", str(PRESET), *TINY_FLAGS]
    result = subprocess.run(
        cmd + ["--output_dir", str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    state = json.loads((out / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "reconstruction_loss" in entry]
    assert len(logged) == 3  # 96 images / batch 16 = 6 steps, logged every 2
    assert {"mto/sparsity_loss", "mto/singularity_loss", "mto/ranking_loss", "mto/heterogeneity/layer_2"} <= set(
        logged[0]
    )
    assert "eval_loss" in json.loads((out / "eval_results.json").read_text())

    model = AutoModelForPreTraining.from_pretrained(out)
    assert isinstance(model, hf_mto.ViTMAEMTOForPreTraining)
    processor = AutoImageProcessor.from_pretrained(out)
    assert processor.size == {"height": 32, "width": 32}
    pixels = processor(images=[__import__("PIL.Image").Image.new("L", (28, 28))], return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 32, 32)
    assert torch.isfinite(model(pixels).loss)


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST.exists(), reason="needs Debian's dataset-fashion-mnist")
@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("tiny_cpu_mae_mto.yaml", TINY_FLAGS[1]),
        ("tiny_cpu_simmim_mto.yaml", TINY_FLAGS[1].split(",decoder_")[0] + ",encoder_stride=4"),
    ],
)
def test_pretrain_recipe_runs_compiled_without_graph_breaks(tmp_path, preset, overrides):
    out = tmp_path / "run"
    flags = ["--config", str(ROOT / "recipes" / "configs" / preset), "--config_overrides", overrides]
    flags += ["--torch_compile", "true", "--max_steps", "3", "--logging_steps", "1", "--save_strategy", "no"]
    flags += ["--max_train_samples", "64", "--max_eval_samples", "16", "--per_device_train_batch_size", "16"]
    flags += ["--per_device_eval_batch_size", "16", "--dataloader_num_workers", "0", "--report_to", "none"]
    cmd = [sys.executable, str(ROOT / "recipes" / "pretrain.py"), *flags, "--output_dir", str(out)]
    env = {**os.environ, "TORCH_LOGS": "graph_breaks"}  # dynamo reports every graph break on stderr
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Graph break" not in result.stderr, result.stderr[-3000:]
    logged = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert len(logged) == 3 and all(math.isfinite(e["mto/ranking_loss"]) for e in logged)


def test_yaml_preset_with_command_line_overrides():
    model_args, data_args, training_args = parse_args(
        (ModelArguments, DataArguments, MTOTrainingArguments),
        ["--config", str(PRESET), "--mto_r_weight", "0.5", "--output_dir", "/tmp/x", "--mask_ratio", "0.6"],
    )
    assert training_args.mto_r_weight == 0.5  # command line wins
    assert training_args.mto_spa_weight == 0.003  # from the file
    assert model_args.mask_ratio == 0.6 and model_args.norm_pix_loss is True
    assert data_args.max_train_samples == 20000
    # the learning rate follows the base-lr rule: 1.5e-3 (the preset's) x 128 / 256
    assert training_args.learning_rate == pytest.approx(1.5e-3 * 128 / 256)


def test_unknown_preset_key_and_bad_override_are_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("mto_spa_wieght: 1.0\n")
    with pytest.raises(ValueError, match="mto_spa_wieght"):
        parse_args((ModelArguments, DataArguments, MTOTrainingArguments), ["--config", str(bad)])
    from hf_mto.cli import build_config

    with pytest.raises(ValueError, match="hiden_size=3"):
        build_config(ModelArguments(config_overrides="hiden_size=3"))
    with pytest.raises(ValueError, match="'simmim'"):
        ModelArguments(model_type="simmim")
    with pytest.raises(ValueError, match="norm_pix_loss"):
        build_config(ModelArguments(model_type="simmim_mto", norm_pix_loss=True))


def yaml_of(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("model_type", model_types())
def test_model_type_alone_picks_its_own_tiny_preset(model_type):
    # MAE's preset (the default) has decoder overrides SimMIM's config lacks: SimMIM used to fail on them
    model_args, _, _, training_args = parse_args(
        PRETRAIN_ARGS, ["--model_type", model_type], default_config=pretrain.default_config
    )
    preset = pretrain.tiny_presets()[model_type]
    assert preset.name.startswith("tiny_cpu_") and yaml_of(preset)["model_type"] == model_type
    assert model_args.config_overrides == yaml_of(preset)["config_overrides"]
    assert training_args.output_dir == yaml_of(preset)["output_dir"]
    model = build_model(model_args, build_config(model_args))
    assert isinstance(model, method_for(model_type).model_class) and model.config.hidden_size == 64


def test_default_preset_is_maes_and_a_named_config_wins():
    assert pretrain.default_config([]) == ROOT / "recipes" / "configs" / "tiny_cpu_mae_mto.yaml"
    assert pretrain.default_config(["--num_train_epochs", "1", "--model_type=bootmae_mto"]).name == (
        "tiny_cpu_bootmae_mto.yaml"
    )
    # a config file named on the command line is the base, whatever the model type
    model_args, *_ = parse_args(
        PRETRAIN_ARGS,
        ["--config", str(PRESET), "--model_type", "simmim_mto"],
        default_config=lambda argv: pytest.fail("no default preset is needed"),
    )
    assert model_args.config_overrides == yaml_of(PRESET)["config_overrides"]


def test_model_type_without_a_tiny_preset_is_named(tmp_path, monkeypatch):
    (tmp_path / "tiny_cpu_mae_mto.yaml").write_text(PRESET.read_text())
    (tmp_path / "tiny_cpu_finetune.yaml").write_text("global_pool: true\n")  # fine-tuning's: no model type
    monkeypatch.setattr(pretrain, "CONFIGS", tmp_path)
    with pytest.raises(ValueError, match=r"'simmim_mto' has no tiny CPU preset .*\['vit_mae_mto'\].*--config"):
        parse_args(PRETRAIN_ARGS, ["--model_type", "simmim_mto"], default_config=pretrain.default_config)
    # a model type hf_mto does not know at all: ModelArguments names the known ones
    with pytest.raises(ValueError, match=r"model_type must be one of .*'simim_mto'"):
        parse_args(PRETRAIN_ARGS, ["--model_type", "simim_mto"], default_config=pretrain.default_config)


def test_unknown_dataset_offline_is_a_one_line_error(tmp_path):
    cmd = [sys.executable, str(ROOT / "recipes" / "pretrain.py"), "--dataset_name", "nobody/no-such-dataset"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("pretrain.py: Cannot load dataset 'nobody/no-such-dataset'") and "--train_dir" in last
    assert "Traceback" not in result.stderr
