"""Training-step time and peak memory of hf_mto's models against the upstream HF models, in one run.

Compares, at the same config, weights, batch and mask:
  upstream  transformers' ViTMAEForPreTraining
  mto_off   ViTMAEMTOForPreTraining(use_mto=False)
  mto_on    ViTMAEMTOForPreTraining with the MTO terms added to the loss
and prints each one's median step time (forward + backward + AdamW step) and peak memory as ratios to upstream.
Variants are interleaved round by round so drifts in machine load hit them alike.

    python benchmarks/step_time.py --preset tiny            # CPU: the tiny pre-training preset, batch 128
    python benchmarks/step_time.py --preset vit-b16         # GPU: ViT-B/16 at 224 px, batch 128, bf16 autocast

Memory: on CUDA the peak `torch.cuda.max_memory_allocated` of a step; on CPU (no per-variant allocator peak) the
bytes autograd saves for the backward pass during a step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import ViTMAEConfig, ViTMAEForPreTraining

from hf_mto import ViTMAEMTOConfig, ViTMAEMTOForPreTraining

PRESETS = {
    # the encoder/decoder of recipes/configs/tiny_cpu_mae_mto.yaml
    "tiny": dict(
        config=dict(
            image_size=32,
            patch_size=4,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=256,
            decoder_hidden_size=64,
            decoder_num_hidden_layers=2,
            decoder_num_attention_heads=4,
            decoder_intermediate_size=256,
            norm_pix_loss=True,
        ),
        batch_size=128,
    ),
    # ViTMAEConfig's defaults are ViT-B/16 with the 512-d, 8-block decoder
    "vit-b16": dict(config=dict(norm_pix_loss=True), batch_size=128),
}
VARIANTS = ("upstream", "mto_off", "mto_on")
MTO_WEIGHT = 0.1


def build(variant: str, config_kwargs: dict, device: torch.device):
    torch.manual_seed(0)
    if variant == "upstream":
        model = ViTMAEForPreTraining(ViTMAEConfig(**config_kwargs))
    else:
        model = ViTMAEMTOForPreTraining(ViTMAEMTOConfig(**config_kwargs, use_mto=variant == "mto_on"))
    model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer


def make_step(variant: str, model, optimizer, pixels, noise, autocast_dtype):
    def step():
        with torch.autocast(pixels.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(pixel_values=pixels, noise=noise)
            loss = out.loss
            if variant == "mto_on":
                loss = loss + MTO_WEIGHT * (out.sparsity_loss + out.singularity_loss + out.ranking_loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def inputs_for(config_kwargs, batch_size, device):
    config = ViTMAEConfig(**config_kwargs)
    num_patches = (config.image_size // config.patch_size) ** 2
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch_size, 3, config.image_size, config.image_size, generator=generator)
    noise = torch.rand(batch_size, num_patches, generator=generator)
    return pixels.to(device), noise.to(device)


def time_all(preset: dict, device, autocast_dtype, warmup: int, rounds: int, steps_per_round: int) -> dict:
    pixels, noise = inputs_for(preset["config"], preset["batch_size"], device)
    steps, peaks = {}, {}
    for variant in VARIANTS:
        model, optimizer = build(variant, preset["config"], device)
        steps[variant] = make_step(variant, model, optimizer, pixels, noise, autocast_dtype)
        for _ in range(warmup):
            steps[variant]()
        if device.type == "cuda":
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            steps[variant]()
            sync(device)
            peaks[variant] = torch.cuda.max_memory_allocated(device)
    times = {variant: [] for variant in VARIANTS}
    for _ in range(rounds):
        for variant in VARIANTS:
            sync(device)
            start = time.perf_counter()
            for _ in range(steps_per_round):
                steps[variant]()
            sync(device)
            times[variant].append((time.perf_counter() - start) / steps_per_round)
    return {v: {"step_s": statistics.median(times[v]), "peak_bytes": peaks.get(v)} for v in VARIANTS}


def saved_activation_bytes(step_fn) -> int:
    """Bytes autograd keeps for the backward pass during one step (each storage counted once): on CPU, where no
    allocator peak can be read per variant, this is what makes one variant's step need more memory than another's."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step_fn()
    return sum(storages.values())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch_size", type=int, default=None, help="Override the preset's batch size.")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps_per_round", type=int, default=5)
    parser.add_argument("--json", default=None, help="Also write the results to this JSON file.")
    args = parser.parse_args(argv)

    preset = dict(PRESETS[args.preset])
    if args.batch_size:
        preset["batch_size"] = args.batch_size
    device = torch.device(args.device)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    results = time_all(preset, device, autocast_dtype, args.warmup, args.rounds, args.steps_per_round)
    if device.type == "cpu":
        for variant in VARIANTS:
            model, optimizer = build(variant, preset["config"], device)
            pixels, noise = inputs_for(preset["config"], preset["batch_size"], device)
            step = make_step(variant, model, optimizer, pixels, noise, autocast_dtype)
            results[variant]["peak_bytes"] = saved_activation_bytes(step)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"preset {args.preset}, batch {preset['batch_size']}, {name}, torch {torch.__version__}")
    memory = "peak MiB" if device.type == "cuda" else "saved MiB"
    print(f"{'variant':<10} {'step ms':>9} {'x upstream':>11} {memory:>10} {'x upstream':>11}")
    base = results["upstream"]
    for variant in VARIANTS:
        r = results[variant]
        print(
            f"{variant:<10} {r['step_s'] * 1e3:>9.2f} {r['step_s'] / base['step_s']:>11.3f} "
            f"{r['peak_bytes'] / 2**20:>10.1f} {r['peak_bytes'] / max(base['peak_bytes'], 1):>11.3f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"preset": args.preset, "batch_size": preset["batch_size"], "device": name, **results}, f, indent=2
            )
    return results


if __name__ == "__main__":
    main()
