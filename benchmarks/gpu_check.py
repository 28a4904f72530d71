"""One GPU run, one report: step time and memory against upstream, evolved masking's cost, and a short convergence check.

Sized to fit in 8 minutes of a 15-minute GPU slot: the default `--time_budget_s 420` plus the imports before the
clock starts (a few seconds). Each part runs in turn in a worker process and may use its share of the budget
(`PART_SHARES`), reserved when it starts; a part still running at its deadline is cut (its process killed, a new
one started for the parts after it), so the run never exceeds the budget and the convergence part always gets its
share (it runs before the compiled step times, the parts likeliest to be cut, so a restart never costs it time).
`gpu_check.json` and `gpu_check.md` are written to `--output_dir` after every part and at the end, with each part's
share, allotted and used seconds and status (done, failed, cut), and what a cut part reported before:

1. Step time and peak memory of ours (MTO off, MTO on) as ratios to upstream, `benchmarks/step_time.py` at ViT-B/16,
   224 px, batch 128, bf16 autocast, for MAE and SimMIM, eager and under `torch.compile` (inductor; the upstream
   model compiled too, and the compilation inside the untimed warm-up steps).
2. BootMAE's and ConMIM's step time and memory with MTO on as a ratio to MTO off (they have no upstream), and their
   momentum encoder's share of a step, `benchmarks/bootmae_step_time.py` with each one's ViT-B/16 preset at the same
   batch, bf16 autocast, eager only.
3. The shares of a step with evolved masking (attention pass, tree + mask, training step), `benchmarks/
   evolved_overhead.py` at the same size, for both models.
4. MAE against MAE + MTO at ViT-Ti size (hidden 192, 12 blocks, 3 heads, patch 4, 32 px images), same seed,
   steps and hyper-parameters: pre-training, then the k-NN accuracy of the frozen encoder (`hf_mto.evaluation`) and the
   accuracy after a short fine-tuning (`hf_mto.finetuning`'s classifier, layer-wise lr decay). Fashion-MNIST when
   Debian's files are there, else scikit-learn's digits (upsampled to 32 px); the steps are sized to the part's
   allotted time, and recorded. One seed and a few minutes: a check that the pieces run
   and a first look, not evidence of faster convergence (DESIGN.md, "Evidence for convergence claims").

    # GPU, ready to run as is (from the repository root, after `pip install -e .`): the whole check in 420 s
    python benchmarks/gpu_check.py --output_dir docs/gpu_check_run && cat docs/gpu_check_run/gpu_check.md
    python benchmarks/gpu_check.py --time_budget_s 600 --output_dir outputs/gpu_check_h100   # a longer slot
    python benchmarks/gpu_check.py --smoke --output_dir /tmp/gpu_check   # CPU: every part at tiny sizes
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import multiprocessing
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import bootmae_step_time
import evolved_overhead
import torch
import torch.nn.functional as F
import transformers
import yaml
from step_time import PRESETS, VARIANTS, autocast, inputs_for, sync, time_all

from hf_mto import ViTMAEMTOConfig, ViTMAEMTOForPreTraining
from hf_mto.data import DEFAULT_FASHION_MNIST_DIR, FASHION_MNIST_CLASSES, read_fashion_mnist
from hf_mto.evaluation import evaluate_encoder
from hf_mto.finetuning import FinetuneArguments, build_classification_model, layer_decay_param_groups
from hf_mto.models.vit_gap import ViTGAPConfig, ViTGAPForImageClassification

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"
MODELS = ("mae", "simmim")
SMOKE_ENCODER = dict(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
SMOKE_ENCODER["intermediate_size"] = 64
SMOKE_DECODER = dict(
    decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=64
)
VIT_TI = dict(image_size=32, patch_size=4, hidden_size=192, num_hidden_layers=12, num_attention_heads=3)
VIT_TI["intermediate_size"] = 768
VIT_TI_DECODER = dict(
    decoder_hidden_size=192, decoder_num_hidden_layers=4, decoder_num_attention_heads=3, decoder_intermediate_size=768
)
# The methods with a momentum encoder and no upstream, timed by bootmae_step_time (part name -> report title).
MOMENTUM_METHODS = {"bootmae": "BootMAE", "conmim": "ConMIM"}
# Per mode: the step-time and evolved-masking models ((config, batch, SimMIM mask square) per model, as step_time's
# PRESETS), the BootMAE preset and batch, their warm-up and rounds, the compile backend, and the convergence check's
# model and sizes.
SIZES = {
    "gpu": dict(
        timing=PRESETS["vit-b16"],
        bootmae=(CONFIGS / "vit_base_bootmae_mto_in1k.yaml", 128),  # (preset, batch size)
        conmim=(CONFIGS / "vit_base_conmim_mto_in1k.yaml", 128),
        warmup=3,
        compiled_warmup=5,
        rounds=10,
        steps_per_round=2,
        evolved_rounds=7,
        compile_backend="inductor",
        convergence_model=dict(VIT_TI, **VIT_TI_DECODER, norm_pix_loss=True),
        batch_size=256,
        knn_bank=10000,
        max_pretrain_steps=None,
        max_finetune_steps=None,
    ),
    "smoke": dict(
        timing={
            "mae": (dict(SMOKE_ENCODER, **SMOKE_DECODER, norm_pix_loss=True), 8, None),
            "simmim": (dict(SMOKE_ENCODER, encoder_stride=4), 8, 8),
        },
        bootmae=(CONFIGS / "tiny_cpu_bootmae_mto.yaml", 4),
        conmim=(CONFIGS / "tiny_cpu_conmim_mto.yaml", 4),
        warmup=1,
        compiled_warmup=2,
        rounds=2,
        steps_per_round=1,
        evolved_rounds=2,
        # Inductor compiles C++ on a CPU for minutes; aot_eager runs dynamo and AOT autograd, which is the plumbing.
        compile_backend="aot_eager",
        convergence_model=dict(SMOKE_ENCODER, **SMOKE_DECODER, norm_pix_loss=True),
        batch_size=8,
        knn_bank=64,
        max_pretrain_steps=3,
        max_finetune_steps=2,
    ),
}
SMOKE_IMAGES = {"train": 64, "test": 32}
# Convergence hyper-parameters, both arms alike: pre-training as recipes/configs/tiny_cpu_mae_mto.yaml (its base lr
# per 256 images, MTO weights and affinity, read from it; AdamW betas 0.9/0.95, weight decay 0.05, 10% warm-up then
# cosine),
# fine-tuning as recipes/configs/tiny_cpu_finetune.yaml (base lr 4e-3 per 256 images, layer decay 0.75, weight decay
# 0.05, drop path 0.1, label smoothing 0.1, global pooling, no augmentation), k-NN as hf_mto.evaluation (k 20,
# T 0.07) on the mean of the patch tokens (benchmarks/convergence.py's default at this scale).
TINY_MAE = yaml.safe_load((CONFIGS / "tiny_cpu_mae_mto.yaml").read_text())
PRETRAIN = dict(base_lr=float(TINY_MAE["base_learning_rate"]), betas=(0.9, 0.95), weight_decay=0.05, warmup=0.1)
MTO_WEIGHTS = {term: float(TINY_MAE[f"mto_{term}_weight"]) for term in ("spa", "e", "r")}
MTO_AFFINITY = TINY_MAE.get("mto_affinity", ViTMAEMTOConfig().mto_affinity)
FINETUNE = dict(base_lr=4e-3, layer_decay=0.75, weight_decay=0.05, drop_path_rate=0.1, label_smoothing=0.1)
POOLING = "mean"
# Of the time left for the convergence check, the share each arm's pre-training and fine-tuning get (the rest is for
# evaluation, the checkpoint exported between them, and the calibration steps).
PRETRAIN_SHARE, FINETUNE_SHARE = 0.30, 0.075


# ----------------------------------------------------------------------------------------------------------------
# Parts 1 to 3: step time, BootMAE and evolved masking
# ----------------------------------------------------------------------------------------------------------------


def step_times(sizes: dict, models, device, autocast_dtype, compile_backend: str | None) -> dict:
    """time_all's results per model of `models`, every variant eager or every variant compiled with
    `compile_backend`."""
    results = {}
    warmup = sizes["compiled_warmup"] if compile_backend else sizes["warmup"]
    for model_name in models:
        config, batch_size, mask_patch_size = sizes["timing"][model_name]
        inputs = inputs_for(model_name, config, batch_size, mask_patch_size, device)
        try:
            results[model_name] = time_all(
                model_name,
                config,
                inputs,
                device,
                autocast_dtype,
                warmup,
                sizes["rounds"],
                sizes["steps_per_round"],
                compile_backend,
            )
        finally:  # a failed compiled part must not leave its graphs to the parts after it
            if compile_backend:
                torch._dynamo.reset()
    return results


def momentum_times(sizes: dict, method: str, device, autocast_dtype) -> dict:
    """bootmae_step_time.measure for the mode's preset and batch of `method` ("bootmae", "conmim"; eager)."""
    preset, batch_size = sizes[method]
    return {
        "preset": str(preset.relative_to(ROOT)),
        **bootmae_step_time.measure(
            preset, device, sizes["warmup"], sizes["rounds"], sizes["steps_per_round"], autocast_dtype, batch_size
        ),
    }


def evolved_shares(sizes: dict, device, autocast_dtype) -> dict:
    """evolved_overhead.measure per model, with each part's share of their sum."""
    results = {}
    for model_name in MODELS:
        config, batch_size, mask_patch_size = sizes["timing"][model_name]
        result = evolved_overhead.measure(
            model_name,
            config,
            batch_size,
            mask_patch_size,
            device,
            autocast_dtype,
            sizes["evolved_rounds"],
            sizes["warmup"],
        )
        total = sum(result[part] for part in evolved_overhead.PARTS)
        result["shares"] = {part: result[part] / total for part in evolved_overhead.PARTS}
        results[model_name] = result
    return results


# ----------------------------------------------------------------------------------------------------------------
# Part 4: convergence, MAE against MAE + MTO
# ----------------------------------------------------------------------------------------------------------------


class Examples(torch.utils.data.Dataset):
    """`{"pixel_values", "label"}` examples over image and label tensors, as hf_mto.evaluation reads them."""

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor):
        self.pixels, self.labels = pixels, labels.tolist()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"pixel_values": self.pixels[index], "label": self.labels[index]}


def to_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """[N, h, w] grey images in [0, 1] -> [N, 3, size, size], bilinear, normalised to [-1, 1]."""
    images = F.interpolate(images[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)
    return ((images - 0.5) / 0.5).clamp(-1, 1).expand(-1, 3, -1, -1).contiguous()


def load_images(smoke: bool, size: int, device) -> dict:
    """Fashion-MNIST (train / test) when Debian's files are there, else scikit-learn's digits (the last 297 of a
    seeded shuffle as the test set), as pixel tensors on `device`; a few images of each in smoke mode."""
    if Path(DEFAULT_FASHION_MNIST_DIR).is_dir():
        name, classes = "fashion-mnist", list(FASHION_MNIST_CLASSES)
        splits = {split: read_fashion_mnist(split) for split in ("train", "test")}
        splits = {split: (torch.from_numpy(x) / 255.0, torch.from_numpy(y).long()) for split, (x, y) in splits.items()}
    else:
        from sklearn.datasets import load_digits

        name, classes = "sklearn-digits", [str(digit) for digit in range(10)]
        digits = load_digits()
        order = torch.randperm(len(digits.target), generator=torch.Generator().manual_seed(0))
        images, labels = torch.from_numpy(digits.images)[order] / 16.0, torch.from_numpy(digits.target)[order].long()
        splits = {"train": (images[:-297], labels[:-297]), "test": (images[-297:], labels[-297:])}
    if smoke:
        splits = {split: (x[: SMOKE_IMAGES[split]], y[: SMOKE_IMAGES[split]]) for split, (x, y) in splits.items()}
    data = {split: (to_pixels(x, size).to(device), y.to(device)) for split, (x, y) in splits.items()}
    return {"name": name, "classes": classes, **data}


def batches(num_examples: int, batch_size: int, steps: int, seed: int):
    """`steps` index batches from successive seeded permutations (the last partial batch of each dropped)."""
    generator = torch.Generator().manual_seed(seed)
    per_epoch = max(1, num_examples // batch_size)
    for step in range(steps):
        if step % per_epoch == 0:
            order = torch.randperm(num_examples, generator=generator)
        start = (step % per_epoch) * batch_size
        yield order[start : start + batch_size]


def pretrain_model(config: dict, use_mto: bool, seed: int, device):
    torch.manual_seed(seed)
    config = ViTMAEMTOConfig(**config, use_mto=use_mto, mto_affinity=MTO_AFFINITY)
    return ViTMAEMTOForPreTraining(config).to(device).train()


def pretrain_step(model, optimizer, scheduler, pixels, use_mto: bool, autocast_dtype):
    with autocast(pixels.device, autocast_dtype):
        out = model(pixel_values=pixels)
        loss = out.loss
        if use_mto:
            terms = {"spa": out.sparsity_loss, "e": out.singularity_loss, "r": out.ranking_loss}
            loss = loss + sum(MTO_WEIGHTS[term] * value for term, value in terms.items())
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def pretrain(config, use_mto, data, steps, batch_size, seed, device, autocast_dtype):
    """The pre-trained model and its final loss after `steps` steps of AdamW with warm-up and cosine decay."""
    model = pretrain_model(config, use_mto, seed, device)
    lr = PRETRAIN["base_lr"] * batch_size / 256
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=PRETRAIN["betas"], weight_decay=PRETRAIN["weight_decay"])
    scheduler = transformers.get_cosine_schedule_with_warmup(optimizer, math.ceil(PRETRAIN["warmup"] * steps), steps)
    pixels = data["train"][0]
    for index in batches(len(pixels), batch_size, steps, seed):
        loss = pretrain_step(model, optimizer, scheduler, pixels[index.to(pixels.device)], use_mto, autocast_dtype)
    return model, loss.item()


def knn_accuracy(model, data, bank_size: int, device, autocast_dtype) -> float:
    """k-NN accuracy on the test images with the first `bank_size` training images as the bank."""
    (train_x, train_y), (test_x, test_y) = data["train"], data["test"]
    bank = Examples(train_x[:bank_size], train_y[:bank_size].cpu())
    queries = Examples(test_x, test_y.cpu())
    results = evaluate_encoder(
        model,
        bank,
        queries,
        pooling=POOLING,
        linear_probe=False,
        batch_size=512,
        autocast=lambda: autocast(device, autocast_dtype),
    )
    return results["knn_accuracy"]


def classifier_optimizer(classifier, steps: int, batch_size: int):
    lr = FINETUNE["base_lr"] * batch_size / 256
    groups = layer_decay_param_groups(classifier, FINETUNE["weight_decay"], FINETUNE["layer_decay"])
    for group in groups:
        group["lr"] = lr * group.pop("lr_scale")
    optimizer = torch.optim.AdamW(groups, lr=lr)
    scheduler = transformers.get_cosine_schedule_with_warmup(optimizer, math.ceil(0.1 * steps), steps)
    return optimizer, scheduler


def classifier_step(classifier, optimizer, scheduler, pixels, labels, autocast_dtype):
    with autocast(pixels.device, autocast_dtype):
        logits = classifier(pixel_values=pixels).logits
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=FINETUNE["label_smoothing"])
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def finetune(model, data, steps, batch_size, seed, device, autocast_dtype) -> float:
    """Test accuracy of the classifier built on `model`'s encoder (saved, then loaded as recipes/finetune.py does)
    after `steps` steps."""
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as checkpoint:
        model.save_pretrained(checkpoint)
        args = FinetuneArguments(
            model_name_or_path=checkpoint, global_pool=True, drop_path_rate=FINETUNE["drop_path_rate"]
        )
        torch.manual_seed(seed)
        classifier = build_classification_model(args, data["classes"]).to(device).train()
    optimizer, scheduler = classifier_optimizer(classifier, steps, batch_size)
    (train_x, train_y), (test_x, test_y) = data["train"], data["test"]
    for index in batches(len(train_x), batch_size, steps, seed):
        index = index.to(device)
        classifier_step(classifier, optimizer, scheduler, train_x[index], train_y[index], autocast_dtype)
    classifier.eval()
    correct = 0
    with torch.no_grad(), autocast(device, autocast_dtype):
        for start in range(0, len(test_x), 512):
            logits = classifier(pixel_values=test_x[start : start + 512]).logits
            correct += (logits.argmax(dim=1) == test_y[start : start + 512]).sum().item()
    return correct / len(test_x)


def seconds_per_step(step_fn, warmup: int, timed: int, device) -> float:
    for _ in range(warmup):
        step_fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(timed):
        step_fn()
    sync(device)
    return (time.perf_counter() - start) / timed


def calibrate(config: dict, num_classes: int, batch_size: int, device, autocast_dtype) -> dict:
    """Seconds per step of MAE + MTO pre-training (the slower arm) and of the classifier, on random images."""
    pixels = torch.randn(batch_size, 3, config["image_size"], config["image_size"], device=device)
    labels = torch.randint(num_classes, (batch_size,), device=device)
    model = pretrain_model(config, True, 0, device)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    pretrain_s = seconds_per_step(
        lambda: pretrain_step(model, optimizer, scheduler, pixels, True, autocast_dtype), 3, 5, device
    )
    encoder = {key: config[key] for key in VIT_TI}
    classifier = ViTGAPForImageClassification(ViTGAPConfig(**encoder, num_labels=num_classes)).to(device).train()
    optimizer, scheduler = classifier_optimizer(classifier, 100, batch_size)
    finetune_s = seconds_per_step(
        lambda: classifier_step(classifier, optimizer, scheduler, pixels, labels, autocast_dtype), 3, 5, device
    )
    return {"pretrain_step_s": pretrain_s, "finetune_step_s": finetune_s}


def plan_steps(sizes: dict, seconds_left: float, calibration: dict) -> dict:
    """Pre-training and fine-tuning steps per arm that fit `seconds_left` for both arms (at least one each)."""
    pretrain_steps = int(PRETRAIN_SHARE * seconds_left / calibration["pretrain_step_s"])
    finetune_steps = int(FINETUNE_SHARE * seconds_left / calibration["finetune_step_s"])
    if sizes["max_pretrain_steps"] is not None:
        pretrain_steps = min(pretrain_steps, sizes["max_pretrain_steps"])
        finetune_steps = min(finetune_steps, sizes["max_finetune_steps"])
    return {"pretrain_steps": max(1, pretrain_steps), "finetune_steps": max(1, finetune_steps)}


def convergence(sizes: dict, smoke: bool, seconds_left: float, seed: int, device, autocast_dtype, progress) -> dict:
    """Both arms' pre-training, k-NN accuracy and fine-tuning, their steps sized to fit `seconds_left` (data loading
    and the calibration included); `progress(report)` gets the report so far after the plan and after each arm, so a
    part cut at its deadline keeps the arms it finished."""
    config, batch_size = sizes["convergence_model"], sizes["batch_size"]
    start = time.perf_counter()
    data = load_images(smoke, config["image_size"], device)
    calibration = calibrate(config, len(data["classes"]), batch_size, device, autocast_dtype)
    plan = plan_steps(sizes, seconds_left - (time.perf_counter() - start), calibration)
    num_train = len(data["train"][1])
    report = {
        "dataset": data["name"],
        "num_train": num_train,
        "num_test": len(data["test"][1]),
        "knn_bank": min(sizes["knn_bank"], num_train),
        "model": config,
        "batch_size": batch_size,
        "seed": seed,
        "seconds_left_at_start": seconds_left,
        "calibration": calibration,
        **plan,
        "pretrain_epochs": plan["pretrain_steps"] * batch_size / num_train,
        "finetune_epochs": plan["finetune_steps"] * batch_size / num_train,
        "hyper_parameters": {
            "pretrain": PRETRAIN,
            "mto_weights": MTO_WEIGHTS,
            "mto_affinity": MTO_AFFINITY,
            "finetune": FINETUNE,
            "pooling": POOLING,
        },
        "arms": {},
    }
    progress(report)
    for arm, use_mto in (("mae", False), ("mae_mto", True)):
        timer = time.perf_counter()
        model, loss = pretrain(config, use_mto, data, plan["pretrain_steps"], batch_size, seed, device, autocast_dtype)
        sync(device)
        pretrain_s = time.perf_counter() - timer
        knn = knn_accuracy(model, data, sizes["knn_bank"], device, autocast_dtype)
        timer = time.perf_counter()
        accuracy = finetune(model, data, plan["finetune_steps"], batch_size, seed, device, autocast_dtype)
        report["arms"][arm] = {
            "final_pretrain_loss": loss,
            "knn_accuracy": knn,
            "finetune_accuracy": accuracy,
            "pretrain_s": pretrain_s,
            "finetune_s": time.perf_counter() - timer,
        }
        report["seconds"] = time.perf_counter() - start
        progress(report)
    return report


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    lines = [
        "# GPU check",
        "",
        f"{report['device']}, torch {report['torch']}, transformers {report['transformers']}"
        f"{', smoke mode (tiny sizes: plumbing only, no figures)' if report['smoke'] else ''}; "
        f"{report['elapsed_s']:.0f} s of a {report['time_budget_s']:.0f} s budget.",
    ]
    memory = "peak MiB" if report["memory"] == "cuda_peak" else "saved-for-backward MiB"
    if "step_time" in report:
        lines += ["", f"## Step time and memory against upstream ({report['timing_setting']})", ""]
        lines += [f"| model | torch.compile | variant | step ms | x upstream (quartiles) | {memory} | x upstream |"]
        lines += ["|---|---|---|---|---|---|---|"]
        for compiled, by_model in report["step_time"].items():
            for model_name, results in by_model.items():
                base = results["upstream"]["peak_bytes"]
                for variant in VARIANTS:
                    r = results[variant]
                    low, high = r["ratio_quartiles"]
                    lines.append(
                        f"| {model_name} | {compiled} | {variant} | {r['step_s'] * 1e3:.2f} | {r['ratio']:.3f} "
                        f"({low:.3f}-{high:.3f}) | {r['peak_bytes'] / 2**20:.1f} | {r['peak_bytes'] / base:.3f} |"
                    )
    for method, title in MOMENTUM_METHODS.items():
        if not report.get(method):
            continue
        r = report[method]
        lines += ["", f"## {title}: MTO on against MTO off (no upstream), eager", ""]
        lines += [
            f"`{r['preset']}` at batch {r['batch_size']}, {r['masking']} masking, {r['precision']}.",
            "",
            f"| variant | step ms | x mto_off (quartiles) | {memory} | x mto_off | momentum encoder's share |",
            "|---|---|---|---|---|---|",
        ]
        base = r["variants"]["mto_off"]["peak_bytes"]
        for variant, v in r["variants"].items():
            low, high = v["ratio_quartiles"]
            lines.append(
                f"| {variant} | {v['step_s'] * 1e3:.2f} | {v['ratio']:.3f} ({low:.3f}-{high:.3f}) | "
                f"{v['peak_bytes'] / 2**20:.1f} | {v['peak_bytes'] / base:.3f} | {v['teacher_share']:.3f} |"
            )
    if report.get("evolved"):
        lines += ["", "## Evolved masking: shares of a step", ""]
        header = " | ".join(evolved_overhead.PARTS)
        lines += [f"| model | patches | attention layers | {header} | attention pass's FLOP share (floor) |"]
        lines += ["|---|---|---|---|---|---|---|"]
        for model_name, r in report["evolved"].items():
            cells = [f"{r[part] * 1e3:.2f} ms ({r['shares'][part]:.1%})" for part in evolved_overhead.PARTS]
            cells.append(f"{r['attention_flop_share']:.1%}")
            lines.append(f"| {model_name} | {r['patches']} | {r['attention_layers']} | " + " | ".join(cells) + " |")
    if report.get("convergence"):
        c = report["convergence"]
        lines += ["", "## Convergence: MAE against MAE + MTO (one seed; a first look, not evidence)", ""]
        lines += [
            f"{c['dataset']} ({c['num_train']} train, {c['num_test']} test images), batch {c['batch_size']}, seed "
            f"{c['seed']}: {c['pretrain_steps']} pre-training steps ({c['pretrain_epochs']:.2f} epochs) and "
            f"{c['finetune_steps']} fine-tuning steps ({c['finetune_epochs']:.2f} epochs) per arm; k-NN bank "
            f"{c['knn_bank']} training images.",
            "",
            "| arm | k-NN accuracy | fine-tuning accuracy | final pre-training loss | pre-training s | fine-tuning s |",
            "|---|---|---|---|---|---|",
        ]
        for arm, r in c["arms"].items():
            lines.append(
                f"| {arm} | {r['knn_accuracy']:.4f} | {r['finetune_accuracy']:.4f} | {r['final_pretrain_loss']:.4f} "
                f"| {r['pretrain_s']:.1f} | {r['finetune_s']:.1f} |"
            )
    lines += ["", "## Parts: the budget's share of each", ""]
    lines += ["| part | share | allotted s | used s | status |", "|---|---|---|---|---|"]
    for name, part in report["parts"].items():
        lines.append(
            f"| {name} | {part['share']:.3f} | {part['allotted_s']:.1f} | {part['seconds']:.1f} | "
            f"{part['status'].split(':')[0]} |"
        )
    cut = [name for name, part in report["parts"].items() if part["status"] == "cut"]
    if cut:
        lines += [
            "",
            f"Cut at their deadline (figures above, if any, are what they reported before): {', '.join(cut)}.",
        ]
    if report.get("errors"):
        lines += ["", "## Failed parts (tracebacks in the JSON)", ""]
        lines += [f"- {name}: {trace.strip().splitlines()[-1]}" for name, trace in report["errors"].items()]
    return "\n".join(lines) + "\n"


def write(report: dict, output_dir: Path, start: float) -> None:
    report["elapsed_s"] = time.time() - start
    (output_dir / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (output_dir / "gpu_check.md").write_text(markdown(report))


# ----------------------------------------------------------------------------------------------------------------
# The budget: each part in turn, in a worker process, killed at the part's deadline
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """What a part reads in the worker: the mode's sizes, the device, and its own deadline (`time.time()`)."""

    sizes: dict
    smoke: bool
    seed: int
    device: torch.device
    autocast_dtype: torch.dtype | None
    deadline: float
    progress: Callable[[dict], None]


# name -> (the part, run in the worker; where its result goes in the report). The compiled step times are one part
# per model, so a model whose compilation overruns costs only its own figures.
PARTS = {
    "step_time_eager": (
        lambda run: step_times(run.sizes, MODELS, run.device, run.autocast_dtype, None),
        ("step_time", "compile_off"),
    ),
    **{
        method: (
            lambda run, method=method: momentum_times(run.sizes, method, run.device, run.autocast_dtype),
            (method,),
        )
        for method in MOMENTUM_METHODS
    },
    "evolved": (lambda run: evolved_shares(run.sizes, run.device, run.autocast_dtype), ("evolved",)),
    # Before the compiled parts, the likeliest to be cut: a worker restarted after a cut takes its start-up out of
    # the parts after the cut, and that must not be the convergence check's promised time.
    "convergence": (
        lambda run: convergence(
            run.sizes, run.smoke, run.deadline - time.time(), run.seed, run.device, run.autocast_dtype, run.progress
        ),
        ("convergence",),
    ),
    **{
        f"step_time_compiled_{model}": (
            lambda run, model=model: step_times(
                run.sizes, (model,), run.device, run.autocast_dtype, run.sizes["compile_backend"]
            ),
            ("step_time", "compile_on"),
        )
        for model in MODELS
    },
}
# Each part's share of the budget, sized from the H200 run of docs/gpu_check_h200.json (in one process, no per-part
# budget): eager step times took 17 s, BootMAE 10, evolved masking 5, the compiled step times 282 (both models, cold
# compile caches, mostly compilation) and the convergence check the 99 s it was given. ConMIM's part (not yet run on
# a GPU) gets BootMAE's share, from the convergence check's. At the default 420 s that is 25, 15, 15, 10, 78 and
# 139 + 139 s (less the worker's start-up, pro rata): the compiled parts just fit on an H200 and are the first to be
# cut on a slower GPU; `--time_budget_s 600` gives them room.
PART_SHARES = {
    "step_time_eager": 0.06,
    "bootmae": 0.035,
    "conmim": 0.035,  # taken from the convergence check's share (0.22 before), which sizes its steps to its time
    "evolved": 0.025,
    "convergence": 0.185,
    "step_time_compiled_mae": 0.33,
    "step_time_compiled_simmim": 0.33,
}
# Kept free at the end of the budget: killing the last part's process and writing the report.
REPORT_RESERVE_S = 2.0


def allotted_seconds(name: str, parts_left: list[str], seconds_left: float) -> float:
    """The seconds part `name` may run, reserved when it starts: its share of `seconds_left` among the parts not yet
    run (`parts_left`, `name` among them). What a part leaves unused goes to the parts after it, and what is spent
    outside the parts (the worker's start-up, a worker restarted after a cut) comes out of every later part pro rata,
    so no part can eat into another's share and the last part ends by the end of the budget."""
    share = PART_SHARES[name] / sum(PART_SHARES[part] for part in parts_left)
    return max(0.0, share * seconds_left)


def worker(names: list[str], settings: dict, end: float, messages) -> None:
    """Runs the parts `names` in order, in this (worker) process; `messages` gets ("device", None, name), then per
    part ("start", part, (deadline, allotted seconds)), ("partial", part, result) as a part reports progress, and
    ("done", part, result) or ("failed", part, traceback). The budget ends at `end` (`time.time()`)."""
    sizes = SIZES["smoke" if settings["smoke"] else "gpu"]
    device = torch.device("cpu" if settings["smoke"] else "cuda")
    messages.put(("device", None, torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"))
    for index, name in enumerate(names):
        now = time.time()
        allotted = allotted_seconds(name, names[index:], end - now)
        deadline = now + allotted
        messages.put(("start", name, (deadline, allotted)))
        run = Run(
            sizes=sizes,
            smoke=settings["smoke"],
            seed=settings["seed"],
            device=device,
            autocast_dtype=None if settings["smoke"] else torch.bfloat16,
            deadline=deadline,
            progress=lambda result, name=name: messages.put(("partial", name, copy.deepcopy(result))),
        )
        try:
            messages.put(("done", name, PARTS[name][0](run)))
        except Exception:
            messages.put(("failed", name, traceback.format_exc()))


def store(report: dict, name: str, result: dict) -> None:
    """Put a part's result where PARTS says (merged into what the same place holds: the compiled parts share one)."""
    *parents, key = PARTS[name][1]
    place = report
    for parent in parents:
        place = place.setdefault(parent, {})
    place.setdefault(key, {}).update(result)


def part_entry(name: str, allotted_s: float, started_s: float, deadline_s: float) -> dict:
    """A part's record in the report (times in seconds from the start of the run); `seconds` and `status` follow."""
    return {"share": PART_SHARES[name], "allotted_s": allotted_s, "started_s": started_s, "deadline_s": deadline_s}


def run_parts(report: dict, settings: dict, start: float, save: Callable[[], None]) -> None:
    """Every part of PARTS in order, each in turn in a worker process that is killed at the running part's deadline
    (the part recorded as cut, with what it reported before); a new worker then runs the parts after it. Saves the
    report after every part. A CUDA context cannot cross a fork: on a GPU the workers are spawned; on the CPU
    they are forked, which spares them re-importing torch."""
    context = multiprocessing.get_context("fork" if settings["smoke"] else "spawn")
    end = start + report["time_budget_s"] - REPORT_RESERVE_S
    pending = list(PARTS)
    while pending:
        if time.time() >= end:  # nothing left to give: recorded, not started
            for name in pending:
                report["parts"][name] = part_entry(name, 0.0, time.time() - start, time.time() - start)
                report["parts"][name].update(seconds=0.0, status="cut")
            break
        messages = context.Queue()
        process = context.Process(target=worker, args=(pending, settings, end, messages), daemon=True)
        process.start()
        running, deadline, partial = None, end, None  # the worker's start-up is bounded by the end of the budget
        while pending:
            try:
                kind, name, payload = messages.get(timeout=max(0.0, min(1.0, deadline - time.time())))
            except queue.Empty:
                if time.time() < deadline and process.is_alive():
                    continue
                status = "cut" if process.is_alive() else f"failed: its process died (exit code {process.exitcode})"
                process.kill()
                name = running or pending[0]
                if partial is not None:
                    store(report, name, partial)
                if running is None:  # the worker died, or overran the budget, before the part started
                    report["parts"][name] = part_entry(name, 0.0, time.time() - start, time.time() - start)
                report["parts"][name].update(seconds=time.time() - start - report["parts"][name]["started_s"])
                report["parts"][name]["status"] = status
                if status != "cut":
                    report["errors"][name] = status
                print(f"{name}: {status}", flush=True)
                pending.remove(name)
                save()
                break
            if kind == "device":
                report["device"] = payload
            elif kind == "start":
                running, (deadline, allotted), partial = name, payload, None
                report["parts"][name] = part_entry(name, allotted, time.time() - start, deadline - start)
            elif kind == "partial":
                partial = payload
            else:
                if kind == "done":
                    store(report, name, payload)
                else:
                    report["errors"][name] = payload
                    print(f"{name} failed:\n{payload}", flush=True)
                report["parts"][name]["seconds"] = time.time() - start - report["parts"][name]["started_s"]
                report["parts"][name]["status"] = kind
                pending.remove(name)
                running, deadline = None, end
                save()
        process.join(timeout=REPORT_RESERVE_S / 2)
        if process.is_alive():
            process.kill()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=ROOT / "outputs" / "gpu_check")
    parser.add_argument(
        "--time_budget_s", type=float, default=420.0, help="The whole run's budget, in seconds (each part its share)."
    )
    parser.add_argument("--smoke", action="store_true", help="Every part at tiny sizes, on the CPU.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of both convergence arms.")
    args = parser.parse_args(argv)
    if args.time_budget_s <= 0:
        parser.error(f"--time_budget_s must be > 0, got {args.time_budget_s}")

    start = time.time()
    sizes = SIZES["smoke" if args.smoke else "gpu"]
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no GPU here: run with --smoke for the CPU check")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "device": None,  # the worker's, once it has started
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "smoke": args.smoke,
        "time_budget_s": args.time_budget_s,
        "timing_setting": "smoke sizes, batch 8, CPU" if args.smoke else "ViT-B/16, 224 px, batch 128, bf16 autocast",
        "memory": "cpu_saved_for_backward" if args.smoke else "cuda_peak",
        "compile_backend": sizes["compile_backend"],
        "parts": {},  # name -> share, allotted_s, started_s, seconds, status ("done", "failed", "cut", ...)
        "errors": {},  # name -> traceback: a part that fails is recorded, and the next parts still run
    }
    settings = {"smoke": args.smoke, "seed": args.seed}
    run_parts(report, settings, start, lambda: write(report, args.output_dir, start))
    write(report, args.output_dir, start)
    print(markdown(report))
    return report


if __name__ == "__main__":
    raise SystemExit(1 if main()["errors"] else 0)
