"""Images per second of the pre-training input pipeline, against the rate a GPU step consumes them (issue 25).

Writes `--num_images` ImageNet-sized JPEGs (500 x 375, smooth random content, ~quality 90) into a temporary image
folder, loads it as the recipe does (`hf_mto.data.load_datasets` with `--train_dir`, `apply_transform` with
`build_pretraining_transform` at 224 px, `PixelCollator`) and times:

- per stage on one core (torch on one thread): reading the file, decoding it, and the augmentation, per image;
- the whole pipeline through a `torch.utils.data.DataLoader` (batch 128, shuffled) with 0 workers and with
  `--workers` workers (default: the cores here), in images per second.

It then compares the one-core rate with what the GPU steps of `docs/gpu_check_h200.json` consume (ViT-B/16, batch
128: MAE eager and compiled, SimMIM eager) and prints how many loader cores each needs, against the 10 workers of the
ViT-B presets. CPU only; a minute or two.

    python benchmarks/data_throughput.py                       # 512 images, 0 and N workers
    python benchmarks/data_throughput.py --json data.json      # also write the figures
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hf_mto.data import DataArguments, PixelCollator, apply_transform, build_pretraining_transform, load_datasets

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = (500, 375)  # ImageNet's typical width x height
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The batch of the recorded GPU steps (gpu_check's timing setting: ViT-B/16, 224 px, batch 128, bf16).
GPU_BATCH = 128
# Loader workers of the ViT-B presets (recipes/configs/vit_base_*_in1k.yaml: dataloader_num_workers).
PRESET_WORKERS = 10


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


def stage_seconds(paths: list[Path]) -> dict[str, float]:
    """Median seconds per image of each stage, on one thread: read the file, decode it, augment it."""
    transform = build_pretraining_transform(224, MEAN, STD)
    times = {"read": [], "decode": [], "augment": []}
    for path in paths:
        start = time.perf_counter()
        data = path.read_bytes()
        read = time.perf_counter()
        image = Image.open(io.BytesIO(data))
        image.load()
        decoded = time.perf_counter()
        transform(image)
        done = time.perf_counter()
        times["read"].append(read - start)
        times["decode"].append(decoded - read)
        times["augment"].append(done - decoded)
    return {stage: float(np.median(values)) for stage, values in times.items()}


def loader_images_per_second(dataset, workers: int, batch_size: int, batches: int) -> float:
    """Images per second the DataLoader delivers over `batches` batches, after one warm-up batch (the workers'
    start)."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers, collate_fn=PixelCollator()
    )
    iterator = iter(loader)
    next(iterator)
    count, start = 0, time.perf_counter()
    for _ in range(batches):
        count += next(iterator)["pixel_values"].shape[0]
    return count / (time.perf_counter() - start)


def gpu_images_per_second(report_path: Path) -> dict[str, float]:
    """Images per second that the recorded GPU steps consume (batch size over the step's seconds)."""
    steps = json.loads(report_path.read_text())["step_time"]
    batch = GPU_BATCH
    return {
        "MAE ViT-B/16 eager": batch / steps["compile_off"]["mae"]["upstream"]["step_s"],
        "MAE ViT-B/16 compiled": batch / steps["compile_on"]["mae"]["upstream"]["step_s"],
        "SimMIM ViT-B/16 eager": batch / steps["compile_off"]["simmim"]["upstream"]["step_s"],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--gpu_report", type=Path, default=ROOT / "docs" / "gpu_check_h200.json")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.num_images < 2 * args.batch_size:
        parser.error(f"--num_images must be at least 2 x --batch_size ({2 * args.batch_size}), got {args.num_images}")

    torch.set_num_threads(1)  # a loader worker's share of a core
    with tempfile.TemporaryDirectory() as folder:
        paths = write_jpegs(Path(folder), args.num_images)
        file_kb = float(np.mean([path.stat().st_size for path in paths]) / 1e3)
        stages = stage_seconds(paths[: min(len(paths), 128)])
        dataset = apply_transform(
            load_datasets(DataArguments(train_dir=folder, train_val_split=0.0), cache_dir=str(Path(folder) / "cache"))[
                "train"
            ],
            build_pretraining_transform(224, MEAN, STD),
        )
        batches = args.num_images // args.batch_size - 1
        rates = {
            workers: loader_images_per_second(dataset, workers, args.batch_size, batches)
            for workers in sorted({0, args.workers})
        }
    per_core = rates[0]
    result = {
        "image_size": list(IMAGE_SIZE),
        "file_kb": file_kb,
        "stage_ms": {stage: seconds * 1e3 for stage, seconds in stages.items()},
        "images_per_second_per_core": per_core,
        "images_per_second": {str(workers): rate for workers, rate in rates.items()},
    }
    print(f"{args.num_images} JPEGs of {IMAGE_SIZE[0]} x {IMAGE_SIZE[1]} px, {file_kb:.0f} kB each on average")
    print("one core (torch on one thread), per image:")
    for stage, ms in result["stage_ms"].items():
        print(f"  {stage:<8} {ms:6.2f} ms")
    for workers, rate in rates.items():
        print(f"DataLoader, {workers} workers: {rate:7.1f} images/s")
    if args.gpu_report.exists():
        consumed = gpu_images_per_second(args.gpu_report)
        result["gpu_images_per_second"] = consumed
        slowest = max(result["stage_ms"], key=result["stage_ms"].get)
        print(f"the pipeline's slowest stage: {slowest}; against the GPU steps of {args.gpu_report.name}:")
        for name, rate in consumed.items():
            cores = rate / per_core
            verdict = "fed" if cores <= PRESET_WORKERS else "data-bound"
            presets = f"{PRESET_WORKERS} in the presets: {verdict}"
            print(f"  {name:<24} {rate:7.0f} images/s: {cores:5.1f} loader cores ({presets})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
