"""Cost of evolved masking's merge tree: the rounds of `hf_mto.masking.build_merge_tree` against the sequential
definition (one merge per step, `tests/merge_tree_reference.py`), on the same similarities, in one run.

For each implementation it prints the tree's median time, the torch operators it launches per tree (`torch.profiler`,
operators called from Python, views aside: each is a kernel launch or more on a GPU, where the tree is launch-bound), the
host synchronisations among them and, for the rounds, how many rounds the batch took against the trees' heights. It also
checks that both give the same trees. The similarities are random (no ties) or, with `--checkpoint`, the attention
of a trained model on Fashion-MNIST images (as evolved masking computes them during training).

    python benchmarks/merge_tree.py                                   # CPU proxy: ViT-B/16's 196 patches, batch 128
    python benchmarks/merge_tree.py --checkpoint outputs/vit-mae-mto-tiny --batch_size 128   # real attention, 64 patches
    python benchmarks/merge_tree.py --device cuda --json merge_tree.json                     # on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from merge_tree_reference import sequential_merge_tree  # noqa: E402

from hf_mto.masking import build_merge_tree  # noqa: E402

IMPLEMENTATIONS = {"sequential": sequential_merge_tree, "rounds": build_merge_tree}
# Operators that only make views launch no kernel and are not counted.
VIEW_OPERATORS = {
    "aten::alias",
    "aten::as_strided",
    "aten::detach",
    "aten::diagonal",
    "aten::expand",
    "aten::lift_fresh",
    "aten::reshape",
    "aten::select",
    "aten::slice",
    "aten::transpose",
    "aten::unbind",
    "aten::unsqueeze",
    "aten::view",
}
# Operators that wait for the device: the tree's host synchronisations.
SYNC_OPERATORS = ("aten::nonzero", "aten::item", "aten::_local_scalar_dense", "aten::is_nonzero")


def random_similarity(batch_size: int, num_patches: int, seed: int = 0) -> torch.Tensor:
    """``[B, N, N]`` symmetric uniform similarities: no ties."""
    raw = torch.rand(batch_size, num_patches, num_patches, generator=torch.Generator().manual_seed(seed))
    return raw + raw.transpose(1, 2)


def checkpoint_similarity(checkpoint: str, batch_size: int) -> torch.Tensor:
    """Evolved masking's similarities (its default: the first half of the blocks) from a pre-training checkpoint, on
    the first `batch_size` Fashion-MNIST training images through the checkpoint's evaluation transform."""
    from transformers import AutoModelForPreTraining

    from hf_mto.data import build_evaluation_transform, load_default_dataset
    from hf_mto.evolved import encoder_similarity

    model = AutoModelForPreTraining.from_pretrained(checkpoint).eval()
    transform = build_evaluation_transform(model.config.image_size)
    images = load_default_dataset()["train"].select(range(batch_size))["image"]
    pixels = torch.stack([transform(image) for image in images])
    return encoder_similarity(model, pixels, max(1, model.config.num_hidden_layers // 2))


def count_operators(fn, similarity: torch.Tensor) -> tuple[int, int]:
    """(operators called from Python that compute, host synchronisations among them) in one call of `fn`."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if similarity.is_cuda else [])
    with profile(activities=activities) as prof:
        fn(similarity)
    top_level = [
        event
        for event in prof.events()
        if event.cpu_parent is None and event.name.startswith("aten::") and event.name not in VIEW_OPERATORS
    ]
    return len(top_level), sum(event.name in SYNC_OPERATORS for event in top_level)


def median_seconds(fn, similarity: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        if similarity.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(similarity)
        if similarity.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def measure(similarity: torch.Tensor, repeats: int) -> dict:
    trees = {name: fn(similarity) for name, fn in IMPLEMENTATIONS.items()}
    same = all(
        torch.equal(getattr(trees["sequential"], field), getattr(trees["rounds"], field))
        for field in ("merges", "levels", "sizes", "heights")
    )
    result = {"batch_size": similarity.shape[0], "patches": similarity.shape[1], "same_trees": same}
    heights = trees["rounds"].heights.float()
    result["tree_height"] = {"mean": heights.mean().item(), "max": int(heights.max())}
    for name, fn in IMPLEMENTATIONS.items():
        operators, syncs = count_operators(fn, similarity)
        result[name] = {"seconds": median_seconds(fn, similarity, repeats), "operators": operators, "syncs": syncs}
    # One synchronisation per round, plus the last one that finds nothing left to merge.
    result["rounds"]["rounds"] = result["rounds"]["syncs"] - 1
    return result


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
    print(f"{result['source']} similarities, batch {result['batch_size']}, {result['patches']} patches; {name}")
    height = result["tree_height"]
    print(f"tree height: mean {height['mean']:.1f}, max {height['max']}; rounds: {result['rounds']['rounds']}")
    print(f"{'implementation':<15} {'ms':>10} {'operators':>10} {'syncs':>6}")
    for impl in IMPLEMENTATIONS:
        r = result[impl]
        print(f"{impl:<15} {r['seconds'] * 1e3:>10.1f} {r['operators']:>10} {r['syncs']:>6}")
    seq, rounds = result["sequential"], result["rounds"]
    print(
        f"rounds / sequential: time {rounds['seconds'] / seq['seconds']:.3f}, "
        f"operators {rounds['operators'] / seq['operators']:.3f}; same trees: {result['same_trees']}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
