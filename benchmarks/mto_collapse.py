"""What MTO does to a model, checkpoint by checkpoint: the measurements behind docs/RESULTS.md's collapse diagnosis.

For every `checkpoint-*` of a pre-training run (or the folders given) it scores, on a fixed batch of Fashion-MNIST
test images and fixed masks (drawn from `--seed`):

- the encoder's features as k-NN sees them (mean-pooled, after the final layernorm, unmasked images): their
  effective rank (exp of the entropy of the normalised singular values; D at most) and the mean cosine similarity
  between images (1 = every image gets the same feature: collapse);
- each MTO term at the checkpoint's own affinity (or `--affinity`'s, to score runs alike), and the heterogeneity of
  the first and last layer of the stack;
- the norms of the stack's first states (H^0): largest / median visible token, and the fraction of visible rows whose
  affinity puts the most mass on the same token (one "sink" token taking every row);
- the gradient each loss part sends into the encoder (norm over the encoder's parameters), at the run's MTO weight:
  reconstruction, w * L_spa, w * L_e, w * L_r, so the term that drives the encoder is visible; and the same parts'
  gradient on the mask token (the learned token every masked patch starts from: in the encoder for SimMIM and
  BEiT, in the decoder for MAE), which MTO's terms act on through the masked rows.

    python benchmarks/mto_collapse.py outputs/convergence/mae_mto-w0.003-lr0.0015-e10-seed1 --weight 0.003

Prints one Markdown row per checkpoint; `--json PATH` writes them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hf_mto.analysis import draw_mask_inputs, load_checkpoint, run_model
from hf_mto.data import build_image_processor, read_fashion_mnist
from hf_mto.evaluation import encoder_features, resolve_encoder
from hf_mto.methods import method_for
from hf_mto.mto import affinity_logits

COLUMNS = (
    "step",
    "feature_rank",
    "feature_cosine",
    "loss",
    "sparsity_loss",
    "singularity_loss",
    "ranking_loss",
    "h_first",
    "h_last",
    "norm_max_over_median",
    "shared_argmax",
    "grad_reconstruction",
    "grad_spa",
    "grad_e",
    "grad_r",
    "mask_token_grad_reconstruction",
    "mask_token_grad_spa",
    "mask_token_grad_e",
    "mask_token_grad_r",
)


def effective_rank(features: torch.Tensor) -> float:
    """exp(entropy) of the normalised singular values of the centred ``[B, D]`` features."""
    singular = torch.linalg.svdvals(features - features.mean(0))
    p = singular / singular.sum()
    return float(torch.exp(-(p * p.clamp_min(1e-12).log()).sum()))


def mean_cosine(features: torch.Tensor) -> float:
    """Mean cosine similarity between different rows of ``[B, D]``."""
    unit = torch.nn.functional.normalize(features, dim=-1)
    gram = unit @ unit.T
    b = gram.shape[0]
    return float((gram.sum() - gram.diagonal().sum()) / (b * (b - 1)))


def images(model, count: int) -> torch.Tensor:
    """``[count, C, H, W]`` Fashion-MNIST test images through the model's evaluation preprocessing."""
    raw, _ = read_fashion_mnist("test")
    processor = build_image_processor(model.config)
    rgb = torch.from_numpy(raw[:count]).unsqueeze(1).expand(-1, model.config.num_channels, -1, -1)
    return processor(list(rgb.numpy()), return_tensors="pt", input_data_format="channels_first")["pixel_values"]


def score(checkpoint: Path, weight: float, count: int, seed: int, affinity: str | None) -> dict:
    model = load_checkpoint(checkpoint)
    if affinity:  # score every run alike, whatever affinity it trained with (or none: a baseline)
        model.config.mto_affinity = affinity
    method = method_for(model)
    pixels = images(model, count)
    generator = torch.Generator().manual_seed(seed)
    mask_inputs = draw_mask_inputs(model, count, generator)
    row = {"step": int(checkpoint.name.rsplit("-", 1)[-1]) if "-" in checkpoint.name else 0}
    with torch.no_grad():
        features = encoder_features(model, pixels, pooling="mean")
    row["feature_rank"] = effective_rank(features)
    row["feature_cosine"] = mean_cosine(features)

    stack = method.mto_stacks[0]
    passed = run_model(model, pixels, mask_inputs)
    first = passed.states[stack][0]
    visible = ~passed.mask
    norms = first.norm(dim=-1)[visible]
    row["norm_max_over_median"] = float(norms.max() / norms.median())
    logits = affinity_logits(first, model.config.mto_affinity, model.config.mto_temperature)
    target = logits.masked_fill(~visible[:, None, :], float("-inf")).argmax(-1)  # [B, N]
    shared = [target[b][visible[b]].mode().values == target[b][visible[b]] for b in range(count)]
    row["shared_argmax"] = float(torch.cat(shared).float().mean())

    encoder = [p for p in resolve_encoder(model).parameters() if p.requires_grad]
    # the learned token that stands in for every masked patch: in the encoder (SimMIM, BEiT) or the decoder (MAE)
    (mask_token,) = [p for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] == "mask_token"]
    model.train()
    outputs = model(pixel_values=pixels, **mask_inputs, use_mto=True)
    terms = method.mto_outputs(outputs)[stack]
    row["loss"] = outputs.loss.item()
    parts = {"grad_reconstruction": outputs.loss}
    for name, key in (("sparsity_loss", "grad_spa"), ("singularity_loss", "grad_e"), ("ranking_loss", "grad_r")):
        row[name] = getattr(terms, name).item()
        parts[key] = weight * getattr(terms, name)
    heterogeneity = terms.heterogeneity.mean(0)
    row["h_first"], row["h_last"] = heterogeneity[0].item(), heterogeneity[-1].item()
    for key, part in parts.items():
        *grads, token_grad = torch.autograd.grad(part, [*encoder, mask_token], retain_graph=True, allow_unused=True)
        row[key] = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))
        row[f"mask_token_{key}"] = 0.0 if token_grad is None else float(token_grad.float().norm())
    return row


def main(argv=None) -> dict[str, list[dict]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (their checkpoint-*) or checkpoints")
    parser.add_argument("--weight", type=float, required=True, help="the run's MTO weight (all three terms)")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--affinity", choices=("dot", "scaled", "cosine"), default=None, help="Default: each checkpoint's own."
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = {}
    for run in args.runs:
        found = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[-1]))
        checkpoints = found or [run]
        rows[str(run)] = [score(c, args.weight, args.images, args.seed, args.affinity) for c in checkpoints]
        print(f"\n{run}\n\n| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS))
        for row in rows[str(run)]:
            print("| " + " | ".join(f"{row[c]:.4g}" for c in COLUMNS) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
