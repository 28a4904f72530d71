"""Heterogeneity analysis of a pre-trained checkpoint (the MTO paper's Section 3) and reconstruction pictures.

Writes to --output_dir:
  - heterogeneity.json / heterogeneity.png: H^0..H^L of the MTO stack (MAE: decoder, SimMIM: encoder), averaged over
    the validation images with seeded masks (the paper's Table 1 and Fig. 1 a); the table is printed too;
  - affinity.json / affinity.png: for one image, each layer's token-token affinity with masked tokens first (Fig. 2);
  - a method with several MTO stacks gets both per stack, named `heterogeneity_<stack>.json` and so on;
  - reconstructions.png: original / masked / reconstruction / reconstruction + visible for a few images.

    python recipes/analyze.py --checkpoint outputs/vit-mae-mto-tiny --output_dir outputs/analysis \
        --max_eval_samples 2000
    python recipes/analyze.py --checkpoint outputs/simmim-mto-tiny --mask_patch_size 8 --num_reconstructions 0

Data arguments are those of `recipes/pretrain.py` (default: the embedded Fashion-MNIST); the validation split is
used, with the evaluation transform. Works whether the checkpoint trained with MTO on or off, and on upstream
checkpoints too (an official MAE, `model_type: vit_mae`, or a `ViTForMaskedImageModeling` one), analysed on their own
weights through the model of ours that extends their class:

    python recipes/analyze.py --checkpoint facebook/vit-mae-base --output_dir outputs/analysis-mae
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoImageProcessor

from hf_mto.analysis import (
    analyze_affinity,
    analyze_heterogeneity,
    check_model,
    draw_mask_inputs,
    load_checkpoint,
    plot_heterogeneity,
    plot_reconstructions,
    reconstruct,
)
from hf_mto.cli import parse_args
from hf_mto.data import DataArguments, apply_transform, build_eval_transform, first_readable_pixels, load_datasets
from hf_mto.masking import MASKING_STRATEGIES


@dataclass
class AnalyzeArguments:
    checkpoint: str = field(metadata={"help": "A pre-trained hf_mto checkpoint (local path or Hub id)."})
    output_dir: str = field(default="outputs/analysis", metadata={"help": "Where the JSON and PNGs go."})
    batch_size: int = field(default=64, metadata={"help": "Images per forward pass."})
    seed: int = field(default=0, metadata={"help": "Seed of the masks."})
    masking: str | None = field(
        default=None,
        metadata={
            "help": f"Mask generator, one of {MASKING_STRATEGIES}; default the model's own (MAE: random, "
            "SimMIM: simmim_block)."
        },
    )
    mask_patch_size: int | None = field(
        default=None, metadata={"help": "SimMIM block side in pixels (default 32, or a quarter of a small image)."}
    )
    affinity_image: int = field(default=0, metadata={"help": "Index of the validation image whose affinity is drawn."})
    affinity_layers: list[int] | None = field(
        default=None, metadata={"help": "Layer depths to draw affinity maps for (default: all, 0 = embedding)."}
    )
    num_reconstructions: int = field(default=8, metadata={"help": "Images in reconstructions.png; 0 skips it."})
    device: str | None = field(default=None, metadata={"help": "Where the model runs (default: cuda if available)."})

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_reconstructions < 0:
            raise ValueError(f"num_reconstructions must be >= 0, got {self.num_reconstructions}")
        if self.affinity_image < 0:
            raise ValueError(f"affinity_image must be >= 0, got {self.affinity_image}")


def main(argv=None):
    args, data_args = parse_args((AnalyzeArguments, DataArguments), argv)
    model = load_checkpoint(args.checkpoint).to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    processor = AutoImageProcessor.from_pretrained(args.checkpoint)
    mean, std = processor.image_mean, processor.image_std
    dataset = load_datasets(data_args)
    if "validation" not in dataset:
        raise ValueError("the data has no validation split (set --train_val_split > 0 or --validation_dir)")
    dataset = apply_transform(dataset["validation"], build_eval_transform(processor.size["height"], mean, std))
    if args.affinity_image >= len(dataset):
        raise ValueError(f"affinity_image {args.affinity_image} out of range: the validation split has {len(dataset)}")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    masks = dict(masking=args.masking, mask_patch_size=args.mask_patch_size)

    image = dataset[args.affinity_image]["pixel_values"]
    if image is None:
        raise ValueError(f"--affinity_image {args.affinity_image} is unreadable (see the warning above); pick another")
    stacks = check_model(model).mto_stacks
    for stack in stacks:
        suffix = "" if len(stacks) == 1 else f"_{stack}"
        result = analyze_heterogeneity(
            model, dataset, batch_size=args.batch_size, seed=args.seed, stack=stack, **masks
        )
        result.extra["checkpoint"] = args.checkpoint
        result.save_json(out / f"heterogeneity{suffix}.json")
        plot_heterogeneity(result, out / f"heterogeneity{suffix}.png")
        print(result.table())
        affinity = analyze_affinity(
            model,
            image,
            out / f"affinity{suffix}.png",
            seed=args.seed,
            layers=args.affinity_layers,
            image_mean=mean,
            image_std=std,
            stack=stack,
            **masks,
        )
        (out / f"affinity{suffix}.json").write_text(json.dumps({"image": args.affinity_image, **affinity}) + "\n")

    if args.num_reconstructions and check_model(model).reconstructs_pixels:
        count = min(args.num_reconstructions, len(dataset))
        pixels = first_readable_pixels(dataset, count)
        mask_inputs = draw_mask_inputs(model, count, torch.Generator().manual_seed(args.seed), **masks)
        pictures = reconstruct(model, pixels, mask_inputs, mean, std)
        plot_reconstructions(
            pictures, out / "reconstructions.png", title=f"{model.config.model_type}: {args.checkpoint}"
        )
    print(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")
    return out


if __name__ == "__main__":
    main()
