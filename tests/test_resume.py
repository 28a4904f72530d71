"""A pre-training run killed mid-training resumes from its last checkpoint onto the uninterrupted trajectory."""

import json
import subprocess
import sys
import textwrap

import pytest
from test_recipe_pretrain import FASHION_MNIST, PRESET, ROOT, TINY_FLAGS

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not FASHION_MNIST.exists(), reason="needs Debian's dataset-fashion-mnist"),
]

# 96 images, batch 16: 6 steps per epoch, 3 epochs, a checkpoint at every epoch end, every step logged.
FLAGS = [*TINY_FLAGS, "--num_train_epochs", "3", "--logging_steps", "1", "--masking", "evolved"]
FLAGS += ["--save_strategy", "epoch", "--eval_strategy", "no", "--save_total_limit", "2", "--seed", "7"]
CRASH_AT_STEP = 9  # in the second epoch, three steps after checkpoint-6
# The tiny presets at the suite's tiny size: MAE's, BEiT's (its k-means tokenizer is fitted at the start and cached
# in output_dir) and ConMIM's (momentum encoder, two views, BatchNorm statistics in the checkpoint): (preset, config
# overrides, the logged loss component)
METHODS = {
    "mae": (PRESET, TINY_FLAGS[1], "reconstruction_loss"),
    "beit": (
        ROOT / "recipes" / "configs" / "tiny_cpu_beit_mto.yaml",
        "image_size=32,patch_size=4,hidden_size=32,num_hidden_layers=2,num_attention_heads=4,intermediate_size=64,"
        "vocab_size=64,tokenizer_type=kmeans,tokenizer_image_size=32,tokenizer_image_mean=0.5,tokenizer_image_std=0.5",
        "reconstruction_loss",
    ),
    "conmim": (
        ROOT / "recipes" / "configs" / "tiny_cpu_conmim_mto.yaml",
        TINY_FLAGS[1].split(",decoder_")[0] + ",projector_hidden_size=48,projector_size=16",
        "contrastive_loss",
    ),
}


def run(output_dir, *extra, crash_at=None, method="mae"):
    """The recipe in a fresh process; with `crash_at`, the process dies abruptly (os._exit) after that step, as a
    killed job would: no clean-up, no final save."""
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(ROOT / "recipes")!r})
        import transformers
        from hf_mto.trainer import MTOTrainer
        crash_at = {crash_at!r}
        if crash_at is not None:
            class Crash(transformers.TrainerCallback):
                def on_step_end(self, args, state, control, **kwargs):
                    if state.global_step == crash_at:
                        os._exit(9)
            init = MTOTrainer.__init__
            def patched(self, *args, **kwargs):
                init(self, *args, **kwargs)
                self.add_callback(Crash())
            MTOTrainer.__init__ = patched
        import pretrain
        pretrain.main(sys.argv[1:])
        """
    )
    preset, overrides, _ = METHODS[method]
    flags = [*FLAGS[:1], overrides, *FLAGS[2:]]  # FLAGS[1]: MAE's config overrides
    cmd = [sys.executable, "-c", script, "--config", str(preset), *flags, "--output_dir", str(output_dir), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=output_dir.parent, timeout=600)


def train_logs(output_dir):
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry for entry in history if "loss" in entry}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_killed_run_resumes_onto_the_uninterrupted_trajectory(tmp_path, method):
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    done = run(reference, method=method)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    killed = run(crashed, crash_at=CRASH_AT_STEP, method=method)
    assert killed.returncode == 9, killed.stdout[-3000:] + killed.stderr[-3000:]
    assert sorted(p.name for p in crashed.glob("checkpoint-*")) == ["checkpoint-6"]  # nothing written after it

    resumed = run(crashed, "--resume_from_checkpoint", str(crashed / "checkpoint-6"), method=method)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    expected, got = train_logs(reference), train_logs(crashed)
    assert sorted(got) == sorted(expected) == list(range(1, 19))
    for step in range(7, 19):
        for key in ("loss", METHODS[method][2], "mto/ranking_loss", "evolved/depth", "evolved/tree_height"):
            assert got[step][key] == pytest.approx(expected[step][key], rel=1e-4, abs=1e-6), (step, key)
    # the depth schedule follows the training progress t = (step - 1) / 18: it rises within the first epoch (every
    # tree over 64 patches is >= 6 high, so step 6 masks at depth >= floor(6 * 5 / 18) = 1) and the resumed run
    # continued it, exactly as uninterrupted
    assert expected[1]["evolved/depth"] == 0 < expected[6]["evolved/depth"]
    assert got[7]["evolved/depth"] > 0
    # save_total_limit=2 is respected across the restart
    assert sorted(p.name for p in crashed.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-18"]
