"""Cost of evolved masking's merge tree (`hf_mto.masking.build_merge_tree`), and how deep its trees are.

Prints the tree's median time, the torch operators it calls per tree (`step_time.count_operators`: operators that do
work, views and allocations aside; each is a kernel launch or more on a GPU, where the tree is launch-bound) and its
host reads of a tensor's value (host synchronisations), with the trees' heights. The height bounds any parallel
route: a node can only be made after its children, so an algorithm that merges in rounds (every pair of reciprocal
nearest neighbours at once, say) needs at least `max height` rounds per batch, against the N - 1 steps of the
sequential merge loop. The similarities are random (no ties) or, with `--checkpoint`, the attention of a pre-trained
model on Fashion-MNIST test images, as evolved masking computes them during training.

    python benchmarks/merge_tree.py                                   # CPU proxy: ViT-B/16's 196 patches, batch 128
    python benchmarks/merge_tree.py --checkpoint outputs/vit-mae-mto-tiny   # real attention, 64 patches, batch 128
    python benchmarks/merge_tree.py --device cuda --json merge_tree.json                     # on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from step_time import count_operators

from hf_mto.masking import build_merge_tree


def random_similarity(batch_size: int, num_patches: int, seed: int = 0) -> torch.Tensor:
    """``[B, N, N]`` symmetric uniform similarities: no ties."""
    raw = torch.rand(batch_size, num_patches, num_patches, generator=torch.Generator().manual_seed(seed))
    return raw + raw.transpose(1, 2)


def checkpoint_similarity(checkpoint: str, batch_size: int) -> torch.Tensor:
    """Evolved masking's similarities (its default: the first half of the blocks) from a pre-training checkpoint, on
    the first `batch_size` Fashion-MNIST test images through the checkpoint's evaluation transform."""
    from transformers import AutoImageProcessor

    from hf_mto.analysis import load_checkpoint
    from hf_mto.data import apply_transform, build_eval_transform, first_readable_pixels, load_fashion_mnist
    from hf_mto.evolved import encoder_similarity

    model = load_checkpoint(checkpoint)
    processor = AutoImageProcessor.from_pretrained(checkpoint)
    transform = build_eval_transform(processor.size["height"], processor.image_mean, processor.image_std, 1.0)
    pixels = first_readable_pixels(apply_transform(load_fashion_mnist("test"), transform), batch_size)
    return encoder_similarity(model, pixels, max(1, model.config.num_hidden_layers // 2))


def median_seconds(similarity: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        if similarity.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        build_merge_tree(similarity)
        if similarity.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def measure(similarity: torch.Tensor, repeats: int) -> dict:
    heights = build_merge_tree(similarity).heights.float()
    counts = count_operators(lambda: build_merge_tree(similarity), similarity.is_cuda, allow_syncs=True)
    return {
        "batch_size": similarity.shape[0],
        "patches": similarity.shape[1],
        "seconds": median_seconds(similarity, repeats),
        "operators": counts["operators"],
        "syncs": counts["host_reads"],
        "tree_height": {"mean": heights.mean().item(), "max": int(heights.max())},
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--num_patches", type=int, default=196, help="N for random similarities")
    parser.add_argument("--checkpoint", default=None, help="a pre-training checkpoint: its attention, not random")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    if args.checkpoint:
        similarity = checkpoint_similarity(args.checkpoint, args.batch_size)
    else:
        similarity = random_similarity(args.batch_size, args.num_patches)
    result = measure(similarity.to(args.device), args.repeats)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    result.update(device=name, torch=torch.__version__, source=args.checkpoint or "random")
    n, height = result["patches"], result["tree_height"]
    print(f"{result['source']} similarities, batch {result['batch_size']}, {n} patches; {name}")
    print(f"tree: {result['seconds'] * 1e3:.1f} ms, {result['operators']} operators, {result['syncs']} host syncs")
    print(
        f"tree height: mean {height['mean']:.1f}, max {height['max']} of at most {n - 1}: a parallel route needs "
        f">= {height['max']} rounds per batch against {n - 1} sequential steps"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
