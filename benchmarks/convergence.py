"""Does MTO (and evolved masking) converge faster here? A small-scale reproduction of the papers' headline claim.

Every arm pre-trains the tiny CPU preset (recipes/configs/tiny_cpu_*.yaml) on a Fashion-MNIST train subset with the
same seeds, budget and hyper-parameters, through the real recipe (`recipes/pretrain.py`, one fresh process per run).
After every epoch the frozen encoder is scored on the Fashion-MNIST test split: k-NN accuracy (k=20, cosine,
T=0.07) and linear-probe accuracy (`hf_mto.evaluation`) of the mean-pooled patch features. At the epochs of
`--finetune_epochs` the pre-training checkpoint is fine-tuned with `recipes/finetune.py` and its tiny preset
(recipes/configs/tiny_cpu_finetune.yaml) on the same budget for every arm (`--finetune_num_epochs`,
`--finetune_train_samples`, `--finetune_eval_samples`, `--finetune_lr`; `--finetune_trainable_blocks` for MAE's
partial fine-tuning), and its accuracy on Fashion-MNIST test images recorded.

Arms: `mae`, `simmim` (the baselines, at `--mae_lr` / `--simmim_lr`), `simmim_mto` (MTO with the presets'
affinity, the config default: the cosine / 0.1), the MAE affinity arms `mae_mto` (`"scaled"`, the default before issue
24, kept for its studies), `mae_mto_dot` (the raw dot product) and `mae_mto_cosine` (the default), `mae_evolved`,
`mae_mto_evolved` (evolved masking), `bootmae`, `bootmae_mto` (at `--bootmae_lr`), `beit` (BEiT's block-wise
masking, k-means tokenizer, the tiny BEiT preset), `beit_evolved`, `beit_mto` (at `--beit_lr`), `conmim`,
`conmim_mto` (at `--conmim_lr`; fine-tuned by the CLS token of their BEiT encoder, `--global_pool false`), and
`random_init`, the floor: the MAE preset's encoder at initialisation (seeded like every run), not trained, scored and
fine-tuned through the same code as the others (a `--do_train false` run of the recipe whose model is then saved).

The report gives, per arm, mean ± std over seeds of the final k-NN, probe and fine-tuning accuracy; the RAUC of each
measure against the arm's baseline (MTO paper Eq. 8, `hf_mto.metrics.RAUC_PATH`) over the measure's evaluated epochs;
the epochs each arm needs to reach its baseline's final accuracy (linear interpolation of the seed-mean curves, or
"not reached"); the median training seconds per epoch as a ratio to the baseline's (evaluation excluded; the median,
so that an epoch disturbed by another job or an interruption does not weigh) and the wall-clock per run and in all.
`--lr_sweep` instead runs the baselines at each of `--learning_rates` plus the floor, and reports the final
accuracies per learning rate, their margin over the floor and whether the last epoch still improved.

    # 1. the baselines' learning-rate sweep, 5 base LRs over two orders of magnitude, 10 epochs, 2 methods, seed 0,
    #    plus the floor (11 runs); chosen: 1.5e-3 for both (the tiny presets' base_learning_rate since)
    python benchmarks/convergence.py --lr_sweep --learning_rates 5e-5 1.5e-4 5e-4 1.5e-3 5e-3 --lr_sweep_epochs 10 \\
        --seeds 0 --train_samples 8000 --test_samples 1000 --bank_samples 2000 --output_dir outputs/convergence

    # 2. the MTO weight sweep (MAE + MTO at the chosen LR, seed 0; the baseline run is step 1's): 6 runs, whose own
    #    wall-clocks sum to 27.0 min (two or three processes at a time); chosen: 0.003 (the default weights since)
    python benchmarks/convergence.py --sweep 0.003 0.01 0.03 0.1 0.3 1.0 --mae_lr 1.5e-3 --seeds 0 --epochs 10 \\
        --train_samples 8000 --test_samples 1000 --bank_samples 2000 --output_dir outputs/convergence

    # 3. the study: the floor + 6 arms x 3 seeds, 10 epochs, fine-tuned at epochs 2 4 7 10 (each 2 epochs on 3,000
    #    images = 48 steps, 2,000 test images scored): 18 pre-training runs, the floor's 3 and 75 fine-tunings, 74 min
    #    in two or three invocations side by side (below); the runs of steps 1 and 2 with the same flags are reused
    python benchmarks/convergence.py --arms random_init mae mae_mto mae_mto_dot mae_evolved simmim simmim_mto \\
        --mae_lr 1.5e-3 --simmim_lr 1.5e-3 --weights 0.003 --seeds 0 1 2 --epochs 10 --train_samples 8000 \\
        --test_samples 1000 --bank_samples 2000 --finetune_epochs 2 4 7 10 --finetune_num_epochs 2 \\
        --finetune_train_samples 3000 --finetune_eval_samples 2000 --output_dir outputs/convergence

    # 4. ConMIM vs ConMIM + MTO (issue 22), 3 seeds, the study's protocol at its size or less: 6 runs side by side,
    #    one process per arm and seed with one thread each (on a 16-core machine with a GPU, which the runs use),
    #    sized to finish in about 6 minutes; then the report of both arms (the second command reuses every run)
    for arm in conmim conmim_mto; do for seed in 0 1 2; do
      OMP_NUM_THREADS=1 python benchmarks/convergence.py --arms $arm --seeds $seed --epochs 8 \\
        --train_samples 8000 --test_samples 1000 --bank_samples 2000 --finetune_epochs 2 4 6 8 \\
        --finetune_num_epochs 2 --finetune_train_samples 3000 --finetune_eval_samples 2000 \\
        --output_dir outputs/convergence-conmim > outputs/conmim-$arm-$seed.log 2>&1 &
    done; done; wait
    python benchmarks/convergence.py --arms conmim conmim_mto --seeds 0 1 2 --epochs 8 --train_samples 8000 \\
        --test_samples 1000 --bank_samples 2000 --finetune_epochs 2 4 6 8 --finetune_num_epochs 2 \\
        --finetune_train_samples 3000 --finetune_eval_samples 2000 --output_dir outputs/convergence-conmim

    # 5. BEiT (issue 23; docs/RESULTS.md section 9): the floor, BEiT, BEiT + evolved masking and BEiT + MTO x 3
    #    seeds, 5 epochs of 4,000 images, fine-tuned at epochs 1, 3 and 5: 12 runs, 45 min in one process
    OMP_NUM_THREADS=1 python benchmarks/convergence.py --arms random_init beit beit_evolved beit_mto --seeds 0 1 2 \\
        --beit_lr 1.5e-3 --weights 0.003 --epochs 5 --train_samples 4000 --test_samples 1000 --bank_samples 2000 \\
        --finetune_epochs 1 3 5 --finetune_num_epochs 2 --finetune_train_samples 3000 --finetune_eval_samples 2000 \\
        --output_dir outputs/convergence-beit

    # 6. MTO's affinity across widths (issue 24; docs/RESULTS.md section A): per width, the baseline's LR sweep, then
    #    the floor, MAE and MAE + MTO with each affinity x 3 seeds at the chosen LR; every invocation (any subset of
    #    arms or seeds, side by side with one thread each) appends to the one convergence.json of the folder
    for w in 64 192 384; do OMP_NUM_THREADS=1 python benchmarks/convergence.py --lr_sweep --arms mae \\
        --learning_rates 5e-4 1.5e-3 5e-3 --width $w --depth 2 --seeds 0 --epochs 6 --train_samples 4000 \\
        --test_samples 1000 --bank_samples 2000 --output_dir outputs/widths-lr; done
    for w_lr in 64:5e-3 192:1.5e-3 384:1.5e-3; do OMP_NUM_THREADS=1 python benchmarks/convergence.py \\
        --arms random_init mae mae_mto mae_mto_dot mae_mto_cosine --weights 0.003 --width ${w_lr%:*} --depth 2 \\
        --mae_lr ${w_lr#*:} --seeds 0 1 2 --epochs 6 --train_samples 4000 --test_samples 1000 \\
        --bank_samples 2000 --finetune_epochs --output_dir outputs/widths-lr; done

    # 7. Fine-tuning that measures (issue 24; docs/RESULTS.md section C): step 6's checkpoints of epochs 3 and 6
    #    (the floor: its model) fine-tuned for 3 epochs on 10,000 labelled images (235 steps), 5,000 test images, at
    #    a fine-tuning LR tuned per width on MAE's seed-0 checkpoint (base 1.6e-2 at 64-d, 4e-3 at 192-d), every arm
    #    alike; the evolved-masking arm is pre-trained here. Each protocol is its own --study beside step 6's
    #    runs; the second fine-tunes only the last block (MAE's partial fine-tuning) from the final checkpoints
    ft="--finetune_num_epochs 3 --finetune_train_samples 10000 --finetune_eval_samples 5000"
    pre="--weights 0.003 --depth 2 --epochs 6 --train_samples 4000 --test_samples 1000 --bank_samples 2000"
    OMP_NUM_THREADS=1 python benchmarks/convergence.py --study finetune-d192 --arms random_init mae \\
        mae_mto_cosine mae_mto_dot mae_evolved --seeds 0 1 2 --width 192 --mae_lr 1.5e-3 $pre \\
        --finetune_epochs 3 6 $ft --finetune_lr 4e-3 --output_dir outputs/widths-lr
    OMP_NUM_THREADS=1 python benchmarks/convergence.py --study finetune-d192-last1 --arms random_init mae \\
        mae_mto_cosine mae_mto_dot mae_evolved --seeds 0 1 2 --width 192 --mae_lr 1.5e-3 $pre \\
        --finetune_epochs 6 $ft --finetune_lr 4e-3 --finetune_trainable_blocks 1 --output_dir outputs/widths-lr
    OMP_NUM_THREADS=1 python benchmarks/convergence.py --study finetune-d64 --arms random_init mae \\
        mae_mto_cosine mae_mto_dot --seeds 0 1 2 --width 64 --mae_lr 5e-3 $pre --finetune_epochs 3 6 $ft \\
        --finetune_lr 1.6e-2 --output_dir outputs/widths-lr
    OMP_NUM_THREADS=1 python benchmarks/convergence.py --study finetune-d64-simmim --arms random_init simmim \\
        simmim_mto --weights 0.003 0.03 0.3 --simmim_lr 5e-3 --width 64 --depth 2 --seeds 0 1 2 --epochs 6 \\
        --train_samples 4000 --test_samples 1000 --bank_samples 2000 --finetune_epochs 6 $ft --finetune_lr 1.6e-2 \\
        --output_dir outputs/widths-lr

    # 8. On a GPU (not run yet: issue 24's part 6): ViT-Ti (192-d, 12 blocks) MAE vs MAE + MTO at the default
    #    cosine, all 60,000 train images, 10 epochs (the LR peaks at epoch 1), 3 seeds, fine-tuned as in step 7 at
    #    epochs 5 and 10; one seed per invocation so that each fits a 15-minute GPU slot (estimated from section 6
    #    of docs/RESULTS.md: 838 ViT-Ti steps at batch 256 took 37 s on an H200), rerun to resume
    for seed in 0 1 2; do python benchmarks/convergence.py --study vit-ti --arms random_init mae mae_mto_cosine \\
        --seeds $seed --width 192 --depth 12 --mae_lr 1.5e-3 --epochs 10 --train_samples 60000 \\
        --test_samples 10000 --bank_samples 10000 --finetune_epochs 5 10 --finetune_num_epochs 3 \\
        --finetune_train_samples 10000 --finetune_eval_samples 5000 --finetune_lr 4e-3 --output_dir outputs/gpu-vit-ti
    done

    python benchmarks/convergence.py --smoke      # a few steps of every path (study arms, fine-tuning, LR sweep): CI

Writes `<output_dir>/<study>.json` (default `convergence.json`: every run's curves, fine-tuning accuracies and
timings) and `<study>.png` (with `--sweep`: `convergence_sweep.*`; with `--lr_sweep`: `lr_sweep.*`), and prints the
tables in the Markdown of docs/RESULTS.md. A study's JSON gathers every invocation's runs (`merge`): run it in pieces
(some arms, seeds or widths at a time, in parallel processes with disjoint arms or seeds, or in 15-minute GPU slots)
and each piece's report covers all that is done; a JSON written with other data or fine-tuning settings is refused by
name. Runs are resumable: a finished run (pre-training or fine-tuning) is reused from its folder when it ran with
exactly the same flags, an interrupted pre-training run resumes from its last epoch checkpoint, and a folder left by
different flags is deleted and rerun; so every command above can be stopped and rerun, and later commands reuse the
runs of earlier ones. Each run's folder is named after its arm, MTO weight, base learning rate, length, shape
(`-d<width>-L<depth>` with --width / --depth) and seed; a fine-tuning's folder inside it after the checkpoint's epoch
and the fine-tuning protocol (`finetune-e4-2x3000`: 2 epochs on 3,000 images; then `-lr<base LR>` with --finetune_lr,
`-last<N>` with --finetune_trainable_blocks); its epoch checkpoints are kept without optimizer states (1.4 MB each, so
about 14 MB per 10-epoch run) for later fine-tuning.

On 2 cores, two invocations with disjoint `--arms` side by side, each with `OMP_NUM_THREADS=1`, do about 1.3 times
the work of one (an MAE + MTO epoch took 13-14 s at one thread beside another such process, an MAE epoch 8.6-9.3 s
alone at two threads); never run two with the default thread count: two processes of two threads each on 2 cores
ran 20-30 times slower here. Rerunning the one command of step 3 afterwards reuses every run and writes the report
of all arms. Measured that way (two or three processes of one thread each, 2026-11-29), a 10-epoch run with its
evaluations and 4 fine-tunings took 4.9-6.7 min on average per arm (the report's last column), the floor 0.9 min.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import NamedTuple

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"
MAE, SIMMIM = CONFIGS / "tiny_cpu_mae_mto.yaml", CONFIGS / "tiny_cpu_simmim_mto.yaml"
BOOTMAE = CONFIGS / "tiny_cpu_bootmae_mto.yaml"
BEIT = CONFIGS / "tiny_cpu_beit_mto.yaml"
CONMIM = CONFIGS / "tiny_cpu_conmim_mto.yaml"
FINETUNE = CONFIGS / "tiny_cpu_finetune.yaml"


class Arm(NamedTuple):
    preset: Path
    mto: bool  # MTO on (at the run's weight)
    masking: str | None  # None: the model's own
    baseline: str | None  # the arm it is compared with (None: the floor)
    affinity: str | None = None  # MTO affinity; None: the preset's
    pretrain: bool = True  # False: the encoder at initialisation (the floor)
    finetune_flags: tuple[str, ...] = ()  # added to the fine-tuning preset's (every arm of a method alike)


ARMS = {
    "mae": Arm(MAE, False, None, "mae"),
    "mae_mto": Arm(MAE, True, None, "mae", affinity="scaled"),
    "mae_mto_dot": Arm(MAE, True, None, "mae", affinity="dot"),
    "mae_mto_cosine": Arm(MAE, True, None, "mae", affinity="cosine"),
    "mae_evolved": Arm(MAE, False, "evolved", "mae"),
    "mae_mto_evolved": Arm(MAE, True, "evolved", "mae"),
    "simmim": Arm(SIMMIM, False, None, "simmim"),
    "simmim_mto": Arm(SIMMIM, True, None, "simmim"),
    "bootmae": Arm(BOOTMAE, False, None, "bootmae"),
    "bootmae_mto": Arm(BOOTMAE, True, None, "bootmae"),
    "beit": Arm(BEIT, False, None, "beit"),  # BEiT's block-wise masking, the preset's
    "beit_evolved": Arm(BEIT, False, "evolved", "beit"),
    "beit_mto": Arm(BEIT, True, None, "beit"),
    # ConMIM's encoder is BEiT's, exported with its CLS pooling: fine-tuned by its CLS token (the fine-tuning
    # preset's global pooling is ViT's)
    "conmim": Arm(CONMIM, False, None, "conmim", finetune_flags=("--global_pool", "false")),
    "conmim_mto": Arm(CONMIM, True, None, "conmim", finetune_flags=("--global_pool", "false")),
    "random_init": Arm(MAE, False, None, None, pretrain=False),
}
BASELINES = ("mae", "simmim", "beit", "conmim")  # the methods of the learning-rate sweep
SMOKE_ARMS = ["mae", "mae_mto_dot", "conmim_mto", "random_init"]
METRICS = ("eval_knn_accuracy", "eval_linear_probe_accuracy")
MEASURES = {"knn": "eval_knn_accuracy", "probe": "eval_linear_probe_accuracy", "finetune": "finetune_accuracy"}
DEFAULT_OUTPUT_DIR = ROOT / "outputs" / "convergence"
RUNS_REUSED = "flags.json"  # written when a run has finished: the flags it ran with
RUNS_STARTED = "flags.started.json"  # written when a run starts (an interrupted run resumes only with these flags)


def preset_lr(preset: Path) -> float:
    return float(yaml.safe_load(preset.read_text())["base_learning_rate"])


def weights_of(arm: str, args) -> list[float]:
    """The MTO weights an MTO arm runs at: --weights, else its preset's."""
    return args.weights or [float(yaml.safe_load(ARMS[arm].preset.read_text())["mto_spa_weight"])]


# The run itself: the recipe's main() plus a callback timing each training epoch (the Trainer evaluates after
# `on_epoch_end`, so evaluation is excluded; keyed by epoch, so a resumed run keeps the times of its first part). A
# run without training (the floor) saves its model and state for fine-tuning and for `collect`.
RUNNER = textwrap.dedent(
    """
    import json, os, sys, time
    sys.path.insert(0, {recipes!r})
    import transformers
    from hf_mto.trainer import MTOTrainer

    times_file = {times_file!r}
    times = json.load(open(times_file)) if os.path.exists(times_file) else {{}}
    trainers = []

    class EpochTimer(transformers.TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()
        def on_epoch_end(self, args, state, control, **kwargs):
            times[str(round(state.epoch))] = time.perf_counter() - self.start
            json.dump(times, open(times_file, "w"))

    init = MTOTrainer.__init__
    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(EpochTimer())
        trainers.append(self)
    MTOTrainer.__init__ = patched
    import pretrain
    pretrain.main(sys.argv[1:])
    if not trainers[0].args.do_train:
        trainers[0].save_model()
        trainers[0].save_state()
    json.dump(times, open(times_file, "w"))
    """
)


def subprocess_env() -> dict[str, str]:
    """This process's environment with the worktree first on PYTHONPATH, so that the runs import this checkout's
    hf_mto even where another copy is installed (editable from a different folder)."""
    paths = [str(ROOT)] + [path for path in os.environ.get("PYTHONPATH", "").split(os.pathsep) if path]
    return os.environ | {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}


def shape_tag(args) -> str:
    """The part of a run's name that --width / --depth add (empty at the presets' shapes)."""
    return (f"-d{args.width}" if args.width else "") + (f"-L{args.depth}" if args.depth else "")


def run_name(arm: str, seed: int, weight: float, lr: float, args) -> str:
    if not ARMS[arm].pretrain:
        return f"{arm}{shape_tag(args)}-seed{seed}"
    return f"{arm}-w{weight:g}-lr{lr:g}-e{args.epochs}{shape_tag(args)}-seed{seed}"


def config_overrides(preset: Path, width: int | None, depth: int | None) -> str:
    """The preset's `config_overrides` with the widths and depths of --width / --depth.

    Width D: hidden size D (the MAE decoder's too, so that MTO's states H^0.. have the width studied), MLP 4 D, heads
    of 64 dims as in ViT-Ti/S/B (D / 64 of them). Depth L: L encoder blocks, and L / 2 (at least 1) decoder blocks
    where the preset has a decoder (its 4 / 2 ratio)."""
    fields = dict(item.split("=", 1) for item in yaml.safe_load(preset.read_text())["config_overrides"].split(","))
    if width is not None:
        if width % 64:
            raise ValueError(f"--width must be a multiple of 64 (heads of 64 dims), got {width}")
        for prefix in ("", "decoder_"):
            if f"{prefix}hidden_size" in fields:
                fields[f"{prefix}hidden_size"] = str(width)
                fields[f"{prefix}intermediate_size"] = str(4 * width)
                fields[f"{prefix}num_attention_heads"] = str(width // 64)
    if depth is not None:
        if depth < 1:
            raise ValueError(f"--depth must be >= 1, got {depth}")
        fields["num_hidden_layers"] = str(depth)
        if "decoder_num_hidden_layers" in fields:
            fields["decoder_num_hidden_layers"] = str(max(1, depth // 2))
    return ",".join(f"{key}={value}" for key, value in fields.items())


def run_flags(arm: str, seed: int, weight: float, lr: float, args, run_dir: Path) -> list[str]:
    """The recipe's command line for one run."""
    spec = ARMS[arm]
    mto_weight = weight if spec.mto else 0.0
    flags = ["--config", str(spec.preset), "--output_dir", str(run_dir)]
    if args.width or args.depth:
        flags += ["--config_overrides", config_overrides(spec.preset, args.width, args.depth)]
    flags += ["--seed", str(seed)]
    flags += ["--num_train_epochs", str(args.epochs)] if spec.pretrain else []  # the floor: one folder per seed
    flags += ["--max_train_samples", str(args.train_samples), "--max_eval_samples", str(args.test_samples)]
    for term in ("spa", "e", "r"):
        flags += [f"--mto_{term}_weight", str(mto_weight)]
    if spec.pretrain:
        flags += ["--base_learning_rate", f"{lr:g}"]
    else:
        flags += ["--do_train", "false"]
    if spec.affinity:
        flags += ["--mto_affinity", spec.affinity]
    # a checkpoint every epoch: fine-tuning points, and the resumption of an interrupted run
    flags += ["--eval_strategy", "epoch", "--save_strategy", "epoch", "--save_total_limit", "1000"]
    flags += ["--report_to", "none", "--logging_steps", "50"]
    flags += ["--encoder_eval", "true", "--encoder_eval_train_samples", str(args.bank_samples)]
    flags += ["--encoder_eval_pooling", args.pooling]
    flags += ["--reconstruction_images", "0", "--dataloader_num_workers", "0"]
    if spec.masking:
        flags += ["--masking", spec.masking]
    if args.smoke:  # 64 images at batch 128: one step per epoch
        flags += ["--max_steps", "2"]
    return flags


def prepare_run_dir(run_dir: Path, flags: list[str], done: list[Path]) -> bool:
    """True when `run_dir` holds a finished run with exactly `flags`. Otherwise leaves the folder ready to (re)start:
    kept when an interrupted run with the same flags is there (the recipe resumes from its last checkpoint), deleted
    when it holds anything else."""
    finished, started = run_dir / RUNS_REUSED, run_dir / RUNS_STARTED
    if all(path.is_file() for path in done) and finished.is_file() and json.loads(finished.read_text()) == flags:
        return True
    if run_dir.exists() and not (
        not finished.is_file() and started.is_file() and json.loads(started.read_text()) == flags
    ):
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    started.write_text(json.dumps(flags))
    return False


def launch(cmd: list[str], run_dir: Path, what: str) -> float:
    """Runs `cmd` in `run_dir`; returns its wall-clock seconds (also written to `wall_seconds.json`)."""
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=run_dir, env=subprocess_env())
    (run_dir / "log.txt").write_text(result.stdout[-20000:] + result.stderr[-20000:])
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    seconds = time.perf_counter() - start
    (run_dir / "wall_seconds.json").write_text(json.dumps(seconds))
    return seconds


def run_arm(arm: str, seed: int, weight: float, lr: float, args, output_dir: Path) -> dict:
    run_dir = output_dir / run_name(arm, seed, weight, lr, args)
    times_file = run_dir / "epoch_seconds.json"
    flags = run_flags(arm, seed, weight, lr, args, run_dir)
    # A finished run is reused only if it ran with exactly these flags (delete the folder to rerun it anyway).
    if not prepare_run_dir(run_dir, flags, [run_dir / "trainer_state.json", times_file]):
        script = RUNNER.format(recipes=str(ROOT / "recipes"), times_file=str(times_file))
        launch([sys.executable, "-c", script, *flags], run_dir, f"{arm} seed {seed}")
        prune_checkpoints(run_dir)
        (run_dir / RUNS_REUSED).write_text(json.dumps(flags))
    run = collect(arm, seed, weight, lr, run_dir)
    run |= {"width": args.width, "depth": args.depth}
    run["num_epochs"] = args.epochs if ARMS[arm].pretrain else 0
    run["finetune"] = finetune_points(run, run_dir, args)
    return run


def prune_checkpoints(run_dir: Path) -> None:
    """A finished run's checkpoints keep only what fine-tuning reads (weights, config, image processor, state)."""
    for checkpoint in run_dir.glob("checkpoint-*"):
        for path in checkpoint.iterdir():
            if path.name.startswith(("optimizer", "scheduler", "rng_state", "scaler")):
                path.unlink()


def checkpoints(run_dir: Path) -> dict[float, Path]:
    """Pre-training epoch -> the checkpoint saved then (the floor: epoch 0 -> its model in `run_dir`)."""
    if not any(run_dir.glob("checkpoint-*")) and (run_dir / "config.json").is_file():
        return {0.0: run_dir}
    found = {}
    for checkpoint in run_dir.glob("checkpoint-*"):
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        found[round(state["epoch"], 6)] = checkpoint
    return found


def finetune_points(run: dict, run_dir: Path, args) -> dict:
    """Fine-tunes the run's checkpoints at `args.finetune_epochs` (the floor: its one model): epochs, accuracies and
    wall-clock seconds, in epoch order."""
    available = checkpoints(run_dir)
    if ARMS[run["arm"]].pretrain:
        wanted = [epoch for epoch in args.finetune_epochs if epoch <= args.epochs]
        missing = [epoch for epoch in wanted if float(epoch) not in available]
        if missing:
            raise RuntimeError(f"{run_dir}: no checkpoint at epochs {missing} (has {sorted(available)})")
        points = {float(epoch): available[float(epoch)] for epoch in wanted}
    else:
        points = dict(available) if args.finetune_epochs else {}
    result = {"epochs": [], "finetune_accuracy": [], "wall_seconds": []}
    for epoch, checkpoint in sorted(points.items()):
        # named by the protocol too, so that two fine-tuning protocols of one run (two studies) keep their folders
        name = f"finetune-e{epoch:g}-{args.finetune_num_epochs}x{args.finetune_train_samples}"
        if args.finetune_lr is not None:
            name += f"-lr{args.finetune_lr:g}"
        if args.finetune_trainable_blocks is not None:
            name += f"-last{args.finetune_trainable_blocks}"
        ft_dir = run_dir / name
        accuracy, seconds = finetune(checkpoint, ft_dir, run["seed"], args, ARMS[run["arm"]].finetune_flags)
        result["epochs"].append(epoch)
        result["finetune_accuracy"].append(accuracy)
        result["wall_seconds"].append(seconds)
    return result


def finetune(checkpoint: Path, ft_dir: Path, seed: int, args, extra_flags=()) -> tuple[float, float]:
    flags = ["--config", str(FINETUNE), "--model_name_or_path", str(checkpoint), "--output_dir", str(ft_dir)]
    flags += list(extra_flags)
    flags += ["--seed", str(seed), "--num_train_epochs", str(args.finetune_num_epochs)]
    flags += ["--max_train_samples", str(args.finetune_train_samples)]
    flags += ["--max_eval_samples", str(args.finetune_eval_samples)]
    if args.finetune_lr is not None:
        flags += ["--base_learning_rate", f"{args.finetune_lr:g}"]
    if args.finetune_trainable_blocks is not None:
        flags += ["--trainable_blocks", str(args.finetune_trainable_blocks)]
    flags += ["--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--logging_steps", "50"]
    flags += ["--dataloader_num_workers", "0"]
    if args.smoke:
        flags += ["--max_steps", "2"]
    results = ft_dir / "eval_results.json"
    if not prepare_run_dir(ft_dir, flags, [results, ft_dir / "wall_seconds.json"]):
        launch([sys.executable, str(ROOT / "recipes" / "finetune.py"), *flags], ft_dir, f"fine-tuning {checkpoint}")
        for weights in ft_dir.glob("*.safetensors"):  # the classifier is not needed afterwards
            weights.unlink()
        (ft_dir / RUNS_REUSED).write_text(json.dumps(flags))
    accuracy = json.loads(results.read_text())["eval_accuracy"]
    return accuracy, json.loads((ft_dir / "wall_seconds.json").read_text())


def collect(arm: str, seed: int, weight: float, lr: float, run_dir: Path) -> dict:
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    evals = [entry for entry in history if METRICS[0] in entry]
    times = json.loads((run_dir / "epoch_seconds.json").read_text())
    return {
        "arm": arm,
        "seed": seed,
        "weight": weight if ARMS[arm].mto else 0.0,
        "lr": float(f"{lr:g}") if ARMS[arm].pretrain else None,  # as passed to the recipe
        "epochs": [entry.get("epoch", 0.0) for entry in evals],  # the floor is evaluated once, untrained
        **{metric: [entry[metric] for entry in evals] for metric in METRICS},
        "epoch_seconds": [times[key] for key in sorted(times, key=int)],
        "wall_seconds": json.loads((run_dir / "wall_seconds.json").read_text()),
    }


def curve(run: dict, measure: str) -> tuple[list[float], list[float]]:
    """(epochs, scores) of one of MEASURES."""
    if measure == "finetune":
        return run["finetune"]["epochs"], run["finetune"]["finetune_accuracy"]
    return run["epochs"], run[MEASURES[measure]]


def rauc(baseline: tuple[list, list], target: tuple[list, list]) -> float | None:
    """RAUC of `target` against `baseline` curves over the baseline's epochs [first, last] (None where undefined)."""
    import evaluate

    import hf_mto.metrics

    epochs, scores = baseline
    if len(epochs) < 2 or len(target[0]) < 2 or scores[-1] == scores[0]:
        return None
    if target[0][0] > epochs[0] or target[0][-1] < epochs[-1]:
        return None
    module = evaluate.load(hf_mto.metrics.RAUC_PATH)
    return module.compute(
        baseline_epochs=epochs,
        baseline_scores=scores,
        target_epochs=target[0],
        target_scores=target[1],
        e1=epochs[0],
        e2=epochs[-1],
    )["rauc"]


def epochs_to_reach(epochs: list[float], scores: list[float], level: float) -> float | None:
    """The first epoch at which the curve (linearly interpolated) reaches `level`; None if it never does."""
    for i, score in enumerate(scores):
        if score >= level:
            if i == 0:
                return epochs[0]
            before, after = scores[i - 1], score
            return epochs[i - 1] + (epochs[i] - epochs[i - 1]) * (level - before) / (after - before)
    return None


def mean_curve(group: list[dict], measure: str) -> tuple[list[float], list[float]]:
    epochs = curve(group[0], measure)[0]
    columns = zip(*(curve(run, measure)[1] for run in group), strict=True)
    return epochs, [statistics.mean(column) for column in columns]


def spread(values: list[float], digits: int = 4) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def shape(run: dict) -> tuple:
    """(width, depth) of a run; (None, None) at its preset's (and in JSON written before --width existed)."""
    return run.get("width"), run.get("depth")


def group_runs(runs: list[dict]) -> dict[tuple, list[dict]]:
    """(arm, weight, lr, width, depth) -> the runs of its seeds."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["arm"], run["weight"], run["lr"], *shape(run)), []).append(run)
    return groups


def shape_text(width: int | None, depth: int | None) -> str:
    """ "192-d, 2 blocks" for --width / --depth; empty at the presets' shapes."""
    return ", ".join(([f"{width}-d"] if width else []) + ([f"{depth} blocks"] if depth else []))


def arm_label(arm: str, width: int | None, depth: int | None) -> str:
    """`arm`, with its width and depth where they are not the preset's: "mae (192-d, 2 blocks)"."""
    shape = shape_text(width, depth)
    return f"{arm} ({shape})" if shape else arm


def lr_of(arm: str, args) -> float:
    lrs = {
        MAE: args.mae_lr,
        SIMMIM: args.simmim_lr,
        BOOTMAE: args.bootmae_lr,
        BEIT: args.beit_lr,
        CONMIM: args.conmim_lr,
    }
    return lrs[ARMS[arm].preset]


def report(runs: list[dict]) -> str:
    groups = group_runs(runs)
    baselines = {
        (run["arm"], run["lr"], run["seed"], *shape(run)): run
        for run in runs
        if ARMS[run["arm"]].baseline == run["arm"]
    }
    measures = [m for m in MEASURES if any(curve(run, m)[0] for run in runs)]
    head = ["arm", "MTO weight", "base LR", "seeds"]
    head += [f"final {m}" for m in measures] + [f"RAUC {m}" for m in measures]
    head += [f"epochs to base final {m}" for m in measures] + ["s/epoch vs baseline", "min/run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (arm, weight, lr, width, depth), group in groups.items():
        spec = ARMS[arm]
        cells = [arm_label(arm, width, depth), f"{weight:g}", "-" if lr is None else f"{lr:g}", str(len(group))]
        cells += [spread([curve(run, m)[1][-1] for run in group if curve(run, m)[1]]) for m in measures]
        base_group = [baselines.get((spec.baseline, lr, run["seed"], width, depth)) for run in group]
        if not spec.pretrain or None in base_group:
            cells += ["n/a"] * (2 * len(measures)) + ["n/a"]
        else:
            for m in measures:
                values = [rauc(curve(base, m), curve(run, m)) for base, run in zip(base_group, group, strict=True)]
                cells.append(spread([v for v in values if v is not None], 2))
            for m in measures:
                if not curve(group[0], m)[0]:
                    cells.append("n/a")
                    continue
                level = statistics.mean(curve(base, m)[1][-1] for base in base_group)
                reached = epochs_to_reach(*mean_curve(group, m), level)
                cells.append("not reached" if reached is None else f"{reached:.2f}")
            ratios = [
                statistics.median(run["epoch_seconds"]) / statistics.median(base["epoch_seconds"])
                for base, run in zip(base_group, group, strict=True)
                if run["epoch_seconds"] and base["epoch_seconds"]
            ]
            cells.append(spread(ratios, 2))
        run_seconds = [run["wall_seconds"] + sum(run["finetune"]["wall_seconds"]) for run in group]
        cells.append(spread([s / 60 for s in run_seconds], 1))
        lines.append("| " + " | ".join(cells) + " |")
    total = sum(run["wall_seconds"] + sum(run["finetune"]["wall_seconds"]) for run in runs)
    lines += ["", f"Wall-clock of all {len(runs)} runs (pre-training + fine-tuning): {total / 60:.1f} min."]

    trained = [run for run in runs if ARMS[run["arm"]].pretrain]
    for m in measures:
        if not trained or not curve(trained[0], m)[0]:
            continue
        epochs = curve(trained[0], m)[0]
        lines += ["", f"| arm | MTO weight | base LR | {m} | " + " | ".join(f"epoch {e:g}" for e in epochs) + " |"]
        lines.append("|---|---|---|---|" + "---|" * len(epochs))
        for (arm, weight, lr, width, depth), group in groups.items():
            if not ARMS[arm].pretrain:  # the floor: one evaluation, in the table above
                continue
            columns = zip(*(curve(run, m)[1] for run in group), strict=True)
            cells = [spread(list(column)) for column in columns]
            shown_lr = "-" if lr is None else f"{lr:g}"
            lines.append(
                f"| {arm_label(arm, width, depth)} | {weight:g} | {shown_lr} | {m} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)


def label(arm: str, weight: float, lr: float | None) -> str:
    text = arm + (f" (w={weight:g})" if ARMS[arm].mto else "")
    return text + (f" lr={lr:g}" if lr is not None else "")


def plot(runs: list[dict], path: Path) -> None:
    """One column per measure, one row per model shape (a study across widths: a row per width)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measures = [m for m in MEASURES if any(curve(run, m)[0] for run in runs)]
    shapes = list(dict.fromkeys(shape(run) for run in runs))
    fig, axes = plt.subplots(len(shapes), len(measures), figsize=(6 * len(measures), 4.5 * len(shapes)), squeeze=False)
    groups = group_runs(runs)
    for row, (width, depth) in zip(axes, shapes, strict=True):
        for ax, m in zip(row, measures, strict=True):
            for (arm, weight, lr, *_), group in ((key, g) for key, g in groups.items() if key[3:] == (width, depth)):
                epochs = curve(group[0], m)[0]
                if not epochs:
                    continue
                values = list(zip(*(curve(run, m)[1] for run in group), strict=True))
                means = [statistics.mean(v) for v in values]
                if not ARMS[arm].pretrain:  # the floor: a level, not a curve
                    ax.axhline(means[0], color="grey", linestyle=":", label=f"{arm} (floor)")
                    continue
                low, high = [min(v) for v in values], [max(v) for v in values]
                style = "--" if ARMS[arm].preset == SIMMIM else "-"
                (line,) = ax.plot(epochs, means, style, marker="o", label=label(arm, weight, lr))
                ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.15)
            ax.set_xlabel("pre-training epoch")
            ax.set_ylabel(f"{m} accuracy")
            where = shape_text(width, depth) or "the presets' shapes"
            ax.set_title(f"Fashion-MNIST test, {m}, {where} (mean, min-max over seeds)", fontsize=9)
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def lr_sweep_summary(runs: list[dict]) -> list[dict]:
    """Per (method, LR, length, shape) and the floor: final k-NN / probe over seeds, their gain over the floor of the
    same shape, and the share of seeds whose last epoch still improved on the one before."""
    floors: dict[tuple, list[dict]] = {}
    for run in runs:
        if not ARMS[run["arm"]].pretrain:
            floors.setdefault(shape(run), []).append(run)
    rows = []
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["arm"], run["lr"], run["num_epochs"], *shape(run)), []).append(run)
    for (arm, lr, epochs, width, depth), group in groups.items():
        row = {"method": arm, "lr": lr, "epochs": epochs, "width": width, "depth": depth, "seeds": len(group)}
        floor = floors.get((width, depth))
        for m in ("knn", "probe"):
            finals = [run[MEASURES[m]][-1] for run in group]
            row[m] = finals
            level = statistics.mean(run[MEASURES[m]][-1] for run in floor) if floor else None
            row[f"{m}_gain_over_floor"] = None if level is None else statistics.mean(finals) - level
            improved = [len(run[MEASURES[m]]) > 1 and run[MEASURES[m]][-1] > run[MEASURES[m]][-2] for run in group]
            row[f"{m}_last_epoch_improved"] = sum(improved) / len(improved) if ARMS[arm].pretrain else None
        rows.append(row)
    return rows


def lr_sweep_report(rows: list[dict]) -> str:
    lines = [
        "| method | base LR | epochs | seeds | final k-NN | final probe | k-NN - floor | probe - floor | last epoch "
        "improved (k-NN / probe, share of seeds) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        gain = [
            "n/a" if row[f"{m}_gain_over_floor"] is None else f"{row[f'{m}_gain_over_floor']:+.4f}"
            for m in ("knn", "probe")
        ]
        improved = (
            "-"
            if row["knn_last_epoch_improved"] is None
            else (f"{row['knn_last_epoch_improved']:.2f} / {row['probe_last_epoch_improved']:.2f}")
        )
        lr = "-" if row["lr"] is None else f"{row['lr']:g}"
        cells = [
            arm_label(row["method"], row.get("width"), row.get("depth")),
            lr,
            str(row["epochs"]),
            str(row["seeds"]),
            spread(row["knn"]),
            spread(row["probe"]),
            *gain,
            improved,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def lr_sweep_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, m in zip(axes, ("knn", "probe"), strict=True):
        curves = sorted(
            {(row["method"], row["epochs"], *shape(row)) for row in rows if row["lr"] is not None},
            key=lambda key: (BASELINES.index(key[0]), key[1], key[2] or 0, key[3] or 0),
        )
        for method, epochs, width, depth in curves:
            points = sorted(
                (row["lr"], row[m])
                for row in rows
                if (row["method"], row["epochs"], *shape(row)) == (method, epochs, width, depth)
            )
            lrs = [lr for lr, _ in points]
            means = [statistics.mean(values) for _, values in points]
            errors = [
                [mean - min(values) for mean, (_, values) in zip(means, points, strict=True)],
                [max(values) - mean for mean, (_, values) in zip(means, points, strict=True)],
            ]
            name = f"{arm_label(method, width, depth)}, {epochs} epochs"
            ax.errorbar(lrs, means, yerr=errors, marker="o", capsize=3, label=name)
        for row in rows:
            if row["lr"] is None:
                name = f"{arm_label('random init', row.get('width'), row.get('depth'))} (floor)"
                ax.axhline(statistics.mean(row[m]), color="grey", linestyle=":", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("base learning rate (lr = base x batch / preset's scaling batch)")
        ax.set_ylabel(f"final {m} accuracy")
        ax.set_title(f"Fashion-MNIST test, final {m} (mean, min-max over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def execute(plan: list[tuple[str, float, float]], args) -> list[dict]:
    runs = []
    for seed in args.seeds:
        for arm, weight, lr in plan:
            runs.append(run_arm(arm, seed, weight, lr, args, args.output_dir))
            last = runs[-1]
            print(
                f"{run_name(arm, seed, weight, lr, args)}: k-NN {last['eval_knn_accuracy']}, "
                f"probe {last['eval_linear_probe_accuracy']}, fine-tune {last['finetune']['finetune_accuracy']} "
                f"at epochs {last['finetune']['epochs']}, s/epoch {last['epoch_seconds']}, "
                f"wall {last['wall_seconds'] + sum(last['finetune']['wall_seconds']):.0f} s",
                flush=True,
            )
    return runs


# What makes two invocations one study (their runs can share a JSON); arms, seeds, weights, learning rates, lengths
# and shapes are in each run's record instead.
STUDY_SETTINGS = (
    "train_samples",
    "test_samples",
    "bank_samples",
    "pooling",
    "finetune_epochs",
    "finetune_num_epochs",
    "finetune_train_samples",
    "finetune_eval_samples",
    "finetune_lr",
    "finetune_trainable_blocks",
    "smoke",
)


def run_key(run: dict) -> tuple:
    return (run["arm"], run["seed"], run["weight"], run["lr"], run["num_epochs"], *shape(run))


def merge(runs: list[dict], name: str, args) -> list[dict]:
    """The runs of `<output_dir>/<name>.json` (earlier invocations of this study) updated with this invocation's.

    A study can so be run in pieces (some arms or seeds at a time, in 15-minute GPU slots, in parallel processes
    with disjoint arms) and each piece's report covers everything done so far. A JSON written with other study
    settings is refused, naming them, rather than mixed in."""
    path = args.output_dir / f"{name}.json"
    if not path.is_file():
        return runs
    recorded = json.loads(path.read_text())
    differing = {
        key: (recorded["args"].get(key), vars(args)[key])
        for key in STUDY_SETTINGS
        if recorded["args"].get(key) != vars(args)[key]
    }
    if differing:
        shown = ", ".join(f"{key} {old!r} there, {new!r} now" for key, (old, new) in differing.items())
        raise SystemExit(f"{path} holds a study with other settings ({shown}): give another --study or --output_dir")
    merged = {run_key(run): run for run in recorded["runs"]}
    merged |= {run_key(run): run for run in runs}
    return list(merged.values())


def write(runs: list[dict], name: str, args, extra: dict | None = None) -> None:
    """Writes `<output_dir>/<name>.json`: the study's settings and all its runs (see `merge`)."""
    args.output_dir.mkdir(parents=True, exist_ok=True)
    settings = vars(args) | {"output_dir": str(args.output_dir)}
    (args.output_dir / f"{name}.json").write_text(
        json.dumps({"args": settings, "runs": runs, **(extra or {})}, indent=1)
    )


def study(args) -> None:
    plan = [
        (arm, weight, lr_of(arm, args))
        for arm in args.arms
        for weight in (weights_of(arm, args) if ARMS[arm].mto else [0.0])
    ]
    name = args.study
    if args.sweep:
        plan = [("mae", 0.0, args.mae_lr)] + [("mae_mto", weight, args.mae_lr) for weight in args.sweep]
        name = "convergence_sweep"
    start = time.perf_counter()
    runs = merge(execute(plan, args), name, args)
    write(runs, name, args, {"wall_seconds_this_invocation": time.perf_counter() - start})
    plot(runs, args.output_dir / f"{name}.png")
    print(report(runs))


def lr_sweep(args) -> None:
    methods = [arm for arm in args.arms if arm in BASELINES] or list(BASELINES)
    start = time.perf_counter()
    runs = []
    for epochs in args.lr_sweep_epochs or [args.epochs]:  # the run's length: its schedule, not a cut of a longer one
        args.epochs = epochs
        runs += execute([(arm, 0.0, lr) for arm in methods for lr in args.learning_rates], args)
    runs += execute([("random_init", 0.0, args.mae_lr)], args)
    runs = merge(runs, "lr_sweep", args)
    rows = lr_sweep_summary(runs)
    extra = {"table": rows, "wall_seconds_this_invocation": time.perf_counter() - start}
    write(runs, "lr_sweep", args, extra)
    lr_sweep_plot(rows, args.output_dir / "lr_sweep.png")
    print(lr_sweep_report(rows))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=None, help="Default: all of them.")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--weights",
        nargs="+",
        type=float,
        default=None,
        help="MTO weight (all three terms) of the MTO arms. Default: each arm's preset's (its mto_spa_weight).",
    )
    parser.add_argument("--sweep", nargs="+", type=float, default=None, help="Sweep the MTO weight of mae_mto.")
    parser.add_argument(
        "--lr_sweep",
        action="store_true",
        help="Sweep the baselines' base learning rate over --learning_rates (methods: the mae / simmim among "
        "--arms, default both) plus the random-init floor; writes lr_sweep.json / .png.",
    )
    parser.add_argument(
        "--learning_rates", nargs="+", type=float, default=[5e-5, 1.5e-4, 5e-4, 1.5e-3, 5e-3], help="For --lr_sweep."
    )
    parser.add_argument(
        "--lr_sweep_epochs",
        nargs="+",
        type=int,
        default=None,
        help="For --lr_sweep: run lengths (epochs) swept too, each a full schedule (default: --epochs).",
    )
    parser.add_argument(
        "--mae_lr", type=float, default=preset_lr(MAE), help="Base LR of every MAE arm (default: the preset's)."
    )
    parser.add_argument(
        "--simmim_lr",
        type=float,
        default=preset_lr(SIMMIM),
        help="Base LR of every SimMIM arm (default: the preset's).",
    )
    parser.add_argument(
        "--bootmae_lr",
        type=float,
        default=preset_lr(BOOTMAE),
        help="Base LR of every BootMAE arm (default: the preset's).",
    )
    parser.add_argument(
        "--beit_lr", type=float, default=preset_lr(BEIT), help="Base LR of every BEiT arm (default: the preset's)."
    )
    parser.add_argument(
        "--conmim_lr",
        type=float,
        default=preset_lr(CONMIM),
        help="Base LR of every ConMIM arm (default: the preset's).",
    )
    parser.add_argument(
        "--width",
        type=int,
        default=None,
        help="Model width D instead of the presets' (a multiple of 64): hidden size D for the encoder and the MAE "
        "decoder, MLP 4 D, heads of 64 dims (192: ViT-Ti's, 384: ViT-S's). Part of each run's name and record.",
    )
    parser.add_argument(
        "--depth",
        type=int,
        default=None,
        help="Encoder blocks instead of the presets' (the MAE decoder gets half, at least 1). Part of each run's name.",
    )
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train_samples", type=int, default=10000, help="Fashion-MNIST train images pre-trained on.")
    parser.add_argument("--test_samples", type=int, default=2000, help="Fashion-MNIST test images scored.")
    parser.add_argument("--bank_samples", type=int, default=5000, help="Labelled train images: k-NN bank and probe.")
    parser.add_argument(
        "--pooling",
        choices=["cls", "mean"],
        default="mean",
        help="Encoder features scored. At this scale the mean of the patch tokens is far more informative than the "
        "CLS token (3-epoch tiny MAE + MTO: k-NN 67%% vs 52%%, probe 77%% vs 64%%; the CLS token is trained only "
        "through the decoder's attention), so it is the default here.",
    )
    parser.add_argument(
        "--finetune_epochs",
        nargs="*",
        type=float,
        default=None,
        help="Pre-training epochs whose checkpoint is fine-tuned (the floor: its untrained model, once). Default: 4 "
        "points spread over --epochs, none with --lr_sweep or --sweep; give the flag without values for none.",
    )
    parser.add_argument("--finetune_num_epochs", type=int, default=2, help="Fine-tuning epochs, every arm alike.")
    parser.add_argument("--finetune_train_samples", type=int, default=3000, help="Fine-tuning train images.")
    parser.add_argument("--finetune_eval_samples", type=int, default=2000, help="Fashion-MNIST test images scored.")
    parser.add_argument(
        "--finetune_lr",
        type=float,
        default=None,
        help="Fine-tuning base learning rate, every arm alike (x batch / 256). Default: the fine-tuning preset's.",
    )
    parser.add_argument(
        "--finetune_trainable_blocks",
        type=int,
        default=None,
        help="Partial fine-tuning (MAE, section 4.3): only the last N encoder blocks and the head train, every arm "
        "alike. Default: full fine-tuning.",
    )
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    parser.add_argument(
        "--study",
        default="convergence",
        help="Name of the study's JSON and plot in --output_dir (<study>.json / .png). Runs of one folder can so "
        "serve several studies: e.g. a second fine-tuning protocol of the same pre-training runs.",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="Two steps per run, for CI: the study (default arms: " + ", ".join(SMOKE_ARMS) + ") with fine-tuning at "
        "2 points, then an LR sweep of mae at 2 learning rates; checks the plumbing only.",
    )
    args = parser.parse_args(argv)
    # refused here, not by the first fine-tuning after hours of pre-training
    blocks = args.finetune_trainable_blocks
    if blocks is not None and blocks < 0:
        parser.error(f"--finetune_trainable_blocks must be >= 0, got {blocks}")
    if blocks is not None and args.depth is not None and blocks > args.depth:
        parser.error(f"--finetune_trainable_blocks must be at most --depth ({args.depth}), got {blocks}")
    args.output_dir = args.output_dir.resolve()  # each run works in its own folder
    if args.smoke:
        args.train_samples, args.test_samples, args.bank_samples = 64, 64, 64
        args.finetune_train_samples, args.finetune_eval_samples = 64, 64
        args.epochs = 2
        if args.output_dir == DEFAULT_OUTPUT_DIR:
            args.output_dir = DEFAULT_OUTPUT_DIR.with_name("convergence-smoke")
    if args.smoke and not args.lr_sweep and args.sweep is None:
        args.arms = args.arms or SMOKE_ARMS
        args.finetune_epochs = [1.0, 2.0] if args.finetune_epochs is None else args.finetune_epochs
        study(args)
        args.lr_sweep, args.finetune_epochs, args.arms = True, [], ["mae"]  # the second LR: one more run
        args.learning_rates = [args.mae_lr, 10 * args.mae_lr]
        lr_sweep(args)
        return
    args.arms = args.arms or list(ARMS)
    if args.finetune_epochs is None:
        if args.lr_sweep or args.sweep:
            args.finetune_epochs = []
        else:
            args.finetune_epochs = sorted({max(1, round(args.epochs * k / 4)) for k in range(1, 5)})
    (lr_sweep if args.lr_sweep else study)(args)


if __name__ == "__main__":
    main()
