"""Pictures of evolved hierarchical masking for a checkpoint: the tree's partitions and the masks over the schedule.

For a few images it writes one PNG each, two rows:
  - the partition of the patches into the maximal subtrees at several depths, one colour per subtree
    (the EHM paper's Fig. 6);
  - the evolved mask at several points of the depth schedule, t = the training progress in [0, 1] (Fig. 7).

    python recipes/visualize_masks.py --checkpoint outputs/vit-mae-mto-tiny --output_dir outputs/mask_pictures
    python recipes/visualize_masks.py --checkpoint outputs/simmim-mto-tiny --train_dir my_images/ --num_images 8

Data arguments are those of `recipes/pretrain.py` (default: the embedded Fashion-MNIST); the validation split is
shown.
"""

from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoImageProcessor  # noqa: E402

import hf_mto  # noqa: E402,F401  (registers the Auto classes)
from hf_mto.analysis import load_checkpoint  # noqa: E402
from hf_mto.cli import parse_args  # noqa: E402
from hf_mto.data import (  # noqa: E402
    DataArguments,
    apply_transform,
    build_eval_transform,
    first_readable_pixels,
    load_datasets,
)
from hf_mto.evolved import encoder_similarity  # noqa: E402
from hf_mto.masking import build_merge_tree, cut_tree, evolved_depth, evolved_mask  # noqa: E402


@dataclass
class VisualizeArguments:
    checkpoint: str = field(metadata={"help": "A pre-trained hf_mto checkpoint (local path or Hub id)."})
    output_dir: str = field(default="outputs/mask_pictures", metadata={"help": "Where the PNGs go."})
    num_images: int = field(default=4, metadata={"help": "How many validation images to draw."})
    evolved_attention_layers: int | None = field(
        default=None, metadata={"help": "Encoder blocks whose attention defines the similarity (default: half)."}
    )
    mask_ratio: float | None = field(default=None, metadata={"help": "Masking ratio (default: the config's)."})
    schedule_points: list[float] = field(
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 0.9],
        metadata={"help": "Training progress points t in [0, 1] of the depth schedule (f0=0, f1=1) to draw masks at."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the mask sampling."})

    def __post_init__(self):
        if self.num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {self.num_images}")
        bad = [t for t in self.schedule_points if not 0.0 <= t <= 1.0]
        if bad:
            raise ValueError(f"schedule_points must lie in [0, 1], got {bad}")


def palette(num_colours: int, seed: int) -> np.ndarray:
    """``[num_colours, 3]`` distinct-enough random colours."""
    return np.random.default_rng(seed).uniform(0.15, 1.0, size=(num_colours, 3))


def patch_grid(values: np.ndarray, grid: int, patch: int) -> np.ndarray:
    """``[N, ...]`` per-patch values -> ``[grid * patch, grid * patch, ...]`` image."""
    image = values.reshape(grid, grid, *values.shape[1:])
    return image.repeat(patch, axis=0).repeat(patch, axis=1)


def draw(image: np.ndarray, partitions, masks, grid: int, patch: int, path: Path) -> None:
    columns = max(len(partitions), len(masks))
    fig, axes = plt.subplots(2, columns, figsize=(2.2 * columns, 4.8), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (depth, labels) in zip(axes[0], partitions, strict=False):
        _, groups = np.unique(labels, return_inverse=True)
        colours = patch_grid(palette(groups.max() + 1, seed=depth)[groups], grid, patch)
        ax.imshow(0.45 * image + 0.55 * colours)
        ax.set_title(f"depth {depth}: {groups.max() + 1} parts", fontsize=8)
    for ax, (t, depth, mask) in zip(axes[1], masks, strict=False):
        shown = image.copy()
        hidden = patch_grid(mask, grid, patch)
        shown[hidden] = 0.3 * shown[hidden] + 0.7 * np.array([0.15, 0.35, 0.85])  # masked patches tinted blue
        ax.imshow(shown)
        ax.set_title(f"t={t:g}, depth {depth}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@torch.no_grad()
def main(argv=None):
    vis_args, data_args = parse_args((VisualizeArguments, DataArguments), argv)
    model = load_checkpoint(vis_args.checkpoint)
    processor = AutoImageProcessor.from_pretrained(vis_args.checkpoint)
    config = model.config
    size = processor.size["height"]
    dataset = apply_transform(
        load_datasets(data_args)["validation"], build_eval_transform(size, processor.image_mean, processor.image_std)
    )
    pixels = first_readable_pixels(dataset, vis_args.num_images)

    layers = vis_args.evolved_attention_layers or max(1, config.num_hidden_layers // 2)
    ratio = vis_args.mask_ratio or config.mask_ratio
    tree = build_merge_tree(encoder_similarity(model, pixels, layers))
    patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
    grid = size // patch
    mean, std = np.array(processor.image_mean), np.array(processor.image_std)
    images = (pixels.permute(0, 2, 3, 1).numpy() * std + mean).clip(0, 1)

    generator = torch.Generator().manual_seed(vis_args.seed)
    out = Path(vis_args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(vis_args.num_images):
        height = int(tree.heights[i])
        depths = sorted({0, height // 4, height // 2, (3 * height) // 4, max(height - 1, 0)})
        partitions = []
        for depth in depths:
            labels = cut_tree(tree, torch.full_like(tree.heights, depth))[i]
            partitions.append((depth, labels.numpy()))
        masks = []
        for t in vis_args.schedule_points:
            depth = evolved_depth(tree.heights, t)
            mask = evolved_mask(tree, depth, ratio, generator=generator)[i]
            masks.append((t, int(depth[i]), mask.numpy()))
        draw(images[i], partitions, masks, grid, patch, out / f"image_{i}.png")
    print(f"wrote {vis_args.num_images} pictures to {out} (tree heights {tree.heights.tolist()}, {layers} layers)")
    return out


if __name__ == "__main__":
    main()
