"""Images per second of the pre-training input pipeline, against the rate a GPU step consumes them (issue 25).

Writes `--num_images` ImageNet-sized JPEGs (500 x 375, smooth random content, ~quality 90) into a temporary image
folder, loads it as the recipe does (`hf_mto.data.load_datasets` with `--train_dir`, `apply_transform`) and times
two pipelines, interleaved (each measurement alternates between them, so that load on a shared machine hits both):

- `uint8` (the default, `build_pretraining_transform` + `PixelCollator(image_mean, image_std)`): JPEGs decoded by
  torchvision's `decode_jpeg`, crop and flip on uint8 tensors, normalisation once per batch on the device;
- `pil` (`build_pil_pretraining_transform` + `PixelCollator()`): PIL decoding and augmentation, float32 per image.

For each it gives the time per image of each stage on one core (torch on one thread: reading the file, decoding it,
the augmentation) and the images per second of the whole pipeline through a `torch.utils.data.DataLoader` (batch
128, random order) with 0 workers (per core) and with `--workers` workers (default: the cores here), and the ratio of
the two pipelines per core (the median of the rounds' paired ratios). It then compares the default pipeline's
per-core rate with what the GPU steps of `docs/gpu_check_h200.json` consume (ViT-B/16, batch 128: MAE eager and
compiled, SimMIM eager): how many loader cores each needs, against the 10 workers of the ViT-B presets. CPU only; a
minute or two.

    python benchmarks/data_throughput.py                       # 0 and N workers, both pipelines
    python benchmarks/data_throughput.py --workers 16 --json data.json

With `--device cuda`: data-bound or compute-bound, measured. The default pipeline with `--workers` loader workers
(10, the ViT-B presets') feeding the device (pinned memory, normalised there) is timed alone, the training step of
MAE ViT-B/16 (`--preset vit-b16`, batch 128, bf16, upstream `ViTMAEForPreTraining`: the fastest consumer; with
`--compile`, under torch.compile) alone on a fixed batch, and the two together (the step fed by the loader). The
loader's rate over the step's is the margin (the issue's target: >= 1.3). On a 16-core H200 machine, ~3 minutes:

    python benchmarks/data_throughput.py --device cuda --workers 10 --compile --batches 40 --json data_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from step_time import PRESETS, build, inputs_for, make_step, sync, timed_rounds

from hf_mto.data import (
    DataArguments,
    PixelCollator,
    apply_transform,
    build_pil_pretraining_transform,
    build_pretraining_transform,
    decode_image,
    decode_image_tensor,
    load_datasets,
)

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = (500, 375)  # ImageNet's typical width x height
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The batch of the recorded GPU steps (gpu_check's timing setting: ViT-B/16, 224 px, batch 128, bf16).
GPU_BATCH = 128
# Loader workers of the ViT-B presets (recipes/configs/vit_base_*_in1k.yaml: dataloader_num_workers).
PRESET_WORKERS = 10
DEFAULT = "uint8"


def pipelines(image_size: int) -> dict[str, tuple]:
    """name → (decode, transform, collator): the default pipeline and the PIL one it replaces."""
    return {
        "uint8": (
            decode_image_tensor,
            build_pretraining_transform(image_size),
            PixelCollator(image_mean=MEAN, image_std=STD),
        ),
        "pil": (decode_image, build_pil_pretraining_transform(image_size, MEAN, STD), PixelCollator()),
    }


def write_jpegs(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` JPEGs of IMAGE_SIZE in `folder`: low-frequency random colour fields plus a little noise, which
    compress to about ImageNet's typical file size, not to the tiny files of flat images or the huge ones of noise."""
    rng = np.random.default_rng(seed)
    width, height = IMAGE_SIZE
    paths = []
    for index in range(count):
        coarse = rng.integers(0, 256, size=(height // 25 + 1, width // 25 + 1, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
        pixels = np.clip(smooth + rng.integers(-12, 13, size=smooth.shape), 0, 255).astype(np.uint8)
        path = folder / "class0" / f"{index:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def stage_seconds(paths: list[Path], image_size: int) -> dict[str, dict[str, float]]:
    """Per pipeline, median seconds per image of each stage on one thread: read the file, decode it, augment it;
    and, for the default pipeline, its per-batch normalisation per image (on the device in training; timed here on
    the CPU). The pipelines alternate image by image."""
    runs = pipelines(image_size)
    times = {name: {"read": [], "decode": [], "augment": []} for name in runs}
    augmented = []
    for path in paths:
        for name, (decode, transform, _) in runs.items():
            start = time.perf_counter()
            value = {"bytes": path.read_bytes(), "path": str(path)}
            read = time.perf_counter()
            image = decode(value)
            decoded = time.perf_counter()
            out = transform(image)
            done = time.perf_counter()
            times[name]["read"].append(read - start)
            times[name]["decode"].append(decoded - read)
            times[name]["augment"].append(done - decoded)
            if name == DEFAULT:
                augmented.append(out)
    stages = {
        name: {stage: float(np.median(values)) for stage, values in runs_times.items()}
        for name, runs_times in times.items()
    }
    batch = runs[DEFAULT][2]([{"pixel_values": pixels} for pixels in augmented])
    start = time.perf_counter()
    runs[DEFAULT][2].on_device(batch)
    stages[DEFAULT]["normalise_on_cpu"] = (time.perf_counter() - start) / len(augmented)
    return stages


def make_loader(dataset, collator, workers: int, batch_size: int, batches: int, pin_memory: bool = False):
    """A DataLoader over `batches` batches of images drawn at random (with replacement: a few hundred files serve any
    number of batches, with the same work per image), plus the batches to skip before timing: one with 0 workers,
    else two per worker (the workers' start and the prefetched batches, `prefetch_factor` 2)."""
    skip = 1 if workers == 0 else 2 * workers + 1
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=(skip + batches) * batch_size)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collator,
        pin_memory=pin_memory,
    )
    return loader, skip


def loader_images_per_second(dataset, collator, workers: int, batch_size: int, batches: int) -> float:
    """Images per second the DataLoader delivers over `batches` batches, after its warm-up (`make_loader`)."""
    loader, skip = make_loader(dataset, collator, workers, batch_size, batches)
    iterator = iter(loader)
    for _ in range(skip):
        next(iterator)
    count, start = 0, time.perf_counter()
    for batch in iterator:
        count += batch["pixel_values"].shape[0]
    return count / (time.perf_counter() - start)


def loader_rates(folder: str, image_size: int, workers: list[int], batch_size: int, batches: int, rounds: int):
    """Per pipeline and worker count, the images per second of each round; the pipelines alternate within a round,
    in an order that rotates from round to round."""
    raw = load_datasets(DataArguments(train_dir=folder, train_val_split=0.0), cache_dir=str(Path(folder) / "cache"))
    runs = {
        name: (apply_transform(raw["train"], transform), collator)
        for name, (_, transform, collator) in pipelines(image_size).items()
    }
    rates = {name: {count: [] for count in workers} for name in runs}
    order = list(runs)
    for round_index in range(rounds):
        shift = round_index % len(order)
        for count in workers:
            for name in order[shift:] + order[:shift]:
                rate = loader_images_per_second(*runs[name], count, batch_size, batches)
                rates[name][count].append(rate)
    return rates, runs


def gpu_images_per_second(report_path: Path) -> dict[str, float]:
    """Images per second that the recorded GPU steps consume (batch size over the step's seconds)."""
    steps = json.loads(report_path.read_text())["step_time"]
    batch = GPU_BATCH
    return {
        "MAE ViT-B/16 eager": batch / steps["compile_off"]["mae"]["upstream"]["step_s"],
        "MAE ViT-B/16 compiled": batch / steps["compile_on"]["mae"]["upstream"]["step_s"],
        "SimMIM ViT-B/16 eager": batch / steps["compile_off"]["simmim"]["upstream"]["step_s"],
    }


def cpu_report(args, folder: str, paths: list[Path]) -> dict:
    stages = stage_seconds(paths[: min(len(paths), 128)], 224)
    workers = sorted({0, args.workers})
    rates, _ = loader_rates(folder, 224, workers, args.batch_size, args.batches, args.rounds)
    ratios = [new / old for new, old in zip(rates[DEFAULT][0], rates["pil"][0], strict=True)]
    result = {
        "default_pipeline": DEFAULT,
        "pipelines": {
            name: {
                "stage_ms": {stage: seconds * 1e3 for stage, seconds in stages[name].items()},
                "images_per_second": {str(count): statistics.median(rates[name][count]) for count in workers},
            }
            for name in rates
        },
        "per_core_ratio": statistics.median(ratios),
    }
    result["images_per_second_per_core"] = result["pipelines"][DEFAULT]["images_per_second"]["0"]
    print("one core (torch on one thread), ms per image:")
    print(f"  {'pipeline':<16} {'read':>6} {'decode':>7} {'augment':>8}")
    for name, figures in result["pipelines"].items():
        ms = figures["stage_ms"]
        print(f"  {name:<16} {ms['read']:6.2f} {ms['decode']:7.2f} {ms['augment']:8.2f}")
    normalise = result["pipelines"][DEFAULT]["stage_ms"]["normalise_on_cpu"]
    print(f"  ({DEFAULT}'s per-batch normalisation, on the device in training: {normalise:.2f} ms/image on this CPU)")
    print(f"DataLoader images/s (median of {args.rounds} interleaved rounds):")
    print(f"  {'pipeline':<16} " + " ".join(f"{f'{count} workers':>11}" for count in workers))
    for name, figures in result["pipelines"].items():
        print(f"  {name:<16} " + " ".join(f"{figures['images_per_second'][str(count)]:11.1f}" for count in workers))
    print(f"per core, {DEFAULT} / pil: {result['per_core_ratio']:.2f}x (median of the rounds' paired ratios)")
    if args.gpu_report.exists():
        per_core = result["images_per_second_per_core"]
        consumed = gpu_images_per_second(args.gpu_report)
        result["gpu_images_per_second"] = consumed
        print(f"against the GPU steps of {args.gpu_report.name}, at {per_core:.0f} images/s per core ({DEFAULT}):")
        for name, rate in consumed.items():
            cores = rate / per_core
            verdict = "fed" if cores <= PRESET_WORKERS else "data-bound"
            print(
                f"  {name:<24} {rate:7.0f} images/s: {cores:5.1f} loader cores "
                f"({PRESET_WORKERS} in the presets: {verdict})"
            )
    return result


def device_report(args, folder: str) -> dict:
    """Loader alone, step alone, step fed by the loader, in images/s on `args.device` (see the module docstring)."""
    device = torch.device(args.device)
    config, preset_batch_size, _ = PRESETS[args.preset]["mae"]
    batch_size = args.batch_size or preset_batch_size
    image_size = config.get("image_size", 224)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    _, transform, collator = pipelines(image_size)[DEFAULT]
    raw = load_datasets(DataArguments(train_dir=folder, train_val_split=0.0), cache_dir=str(Path(folder) / "cache"))
    dataset = apply_transform(raw["train"], transform)

    def batches(count: int):
        """The skip-then-timed batches of a fresh loader, on the device and normalised, as MTOTrainer gets them."""
        loader, skip = make_loader(
            dataset, collator, args.workers, batch_size, count, pin_memory=device.type == "cuda"
        )
        for index, batch in enumerate(loader):
            yield index >= skip, collator.on_device({k: v.to(device, non_blocking=True) for k, v in batch.items()})

    def timed(run, count: int) -> float:
        images, start = 0, None
        for timing, batch in batches(count):
            if timing and start is None:
                sync(device)
                start = time.perf_counter()
            run(batch)
            images += batch["pixel_values"].shape[0] if timing else 0
        sync(device)
        return images / (time.perf_counter() - start)

    loader_rate = timed(lambda batch: None, args.batches)

    model, optimizer = build("mae", "upstream", config, device, "inductor" if args.compile else None)
    inputs = inputs_for("mae", config, batch_size, None, device)
    step = make_step("upstream", model, optimizer, inputs, autocast_dtype)
    for _ in range(args.warmup):
        step()
    step_rate = batch_size / statistics.median(timed_rounds({"step": step}, args.rounds, args.batches, device)["step"])

    def fed_step(batch):
        inputs["pixel_values"] = batch["pixel_values"]  # the step reads `inputs` when called
        step()

    fed_rate = timed(fed_step, args.batches)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cores": len(os.sched_getaffinity(0)),
        "workers": args.workers,
        "preset": args.preset,
        "compile": args.compile,
        "batch_size": batch_size,
        "loader_images_per_second": loader_rate,
        "step_images_per_second": step_rate,
        "fed_step_images_per_second": fed_rate,
        "loader_over_step": loader_rate / step_rate,
        "bound": "data" if loader_rate < step_rate else "compute",
    }
    compiled = ", compiled" if args.compile else ""
    print(
        f"{result['device']}, {result['cores']} cores, MAE {args.preset} upstream step, batch {batch_size}{compiled}:"
    )
    print(f"  loader alone ({args.workers} workers, {DEFAULT}, to the device): {loader_rate:8.0f} images/s")
    print(f"  step alone (fixed batch):                     {step_rate:8.0f} images/s")
    print(f"  step fed by the loader:                       {fed_rate:8.0f} images/s")
    print(f"  loader / step: {result['loader_over_step']:.2f} -> {result['bound']}-bound")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=256, help="JPEG files written (drawn with replacement)")
    parser.add_argument("--batch_size", type=int, default=None, help="default: 128; with --device, the preset's")
    parser.add_argument("--batches", type=int, default=4, help="timed batches per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--gpu_report", type=Path, default=ROOT / "docs" / "gpu_check_h200.json")
    parser.add_argument("--device", default=None, help="measure the loader feeding a training step on this device")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="vit-b16", help="with --device: the MAE model")
    parser.add_argument("--compile", action="store_true", help="with --device: the step under torch.compile")
    parser.add_argument("--warmup", type=int, default=3, help="with --device: untimed steps (compilation)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.device is None:
        args.batch_size = args.batch_size or GPU_BATCH
    for name in ("num_images", "batch_size", "batches", "rounds"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")

    torch.set_num_threads(1)  # a loader worker's share of a core
    with tempfile.TemporaryDirectory() as folder:
        paths = write_jpegs(Path(folder), args.num_images)
        file_kb = float(np.mean([path.stat().st_size for path in paths]) / 1e3)
        print(f"{args.num_images} JPEGs of {IMAGE_SIZE[0]} x {IMAGE_SIZE[1]} px, {file_kb:.0f} kB each on average")
        head = {"image_size": list(IMAGE_SIZE), "file_kb": file_kb}
        if args.device is None:
            result = {**head, **cpu_report(args, folder, paths)}
        else:
            torch.set_num_threads(len(os.sched_getaffinity(0)) if torch.device(args.device).type == "cpu" else 1)
            result = {**head, **device_report(args, folder)}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
