"""Training-step time and peak memory of hf_mto's models against the upstream HF models, in one run.

Compares, for each model at the same config, weights, batch and mask:
  upstream  transformers' ViTMAEForPreTraining / ViTForMaskedImageModeling
  mto_off   ours (ViTMAEMTOForPreTraining / SimMIMMTOForMaskedImageModeling) with use_mto=False
  mto_on    ours with the MTO terms added to the loss
and prints each one's median step time (forward + backward + AdamW step), its step-time ratio to upstream (the
median, and quartiles, of the ratios paired within each round) and its memory as a ratio to upstream. Variants are
interleaved round by round, in rotating order, so drifts in machine load hit them alike.

    python benchmarks/step_time.py --preset tiny            # CPU: the tiny pre-training presets, batch 128
    python benchmarks/step_time.py --preset vit-b16         # GPU: ViT-B/16 at 224 px, batch 128, bf16 autocast
    python benchmarks/step_time.py --models simmim          # one model only
    python benchmarks/step_time.py --preset vit-b16 --compile   # every variant under torch.compile (inductor)

Memory: on CUDA the variant's own peak in a step: its parameters, buffers and optimizer state plus the most the step
allocates on top of what was allocated before it (`torch.cuda.max_memory_allocated`), so that the other variants'
models, alive at the same time, do not count; on CPU (no per-variant allocator peak) the bytes autograd saves for the
backward pass during a step.

With `--compile` every variant, upstream included, runs as `model.compile()` (the default inductor backend, or the
one named); the warm-up steps, which must cover the first call's compilation, are not timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from transformers import ViTConfig, ViTForMaskedImageModeling, ViTMAEConfig, ViTMAEForPreTraining

from hf_mto import SimMIMMTOConfig, SimMIMMTOForMaskedImageModeling, ViTMAEMTOConfig, ViTMAEMTOForPreTraining
from hf_mto.masking import simmim_block_mask

TINY_ENCODER = dict(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=4, num_attention_heads=4)
TINY_ENCODER["intermediate_size"] = 256
# (config, batch size, SimMIM mask square in px) per preset and model: the tiny CPU presets of recipes/configs/, and
# ViT-B/16 (ViTMAEConfig's defaults have the 512-d, 8-block decoder).
PRESETS = {
    "tiny": {
        "mae": (
            dict(
                TINY_ENCODER,
                decoder_hidden_size=64,
                decoder_num_hidden_layers=2,
                decoder_num_attention_heads=4,
                decoder_intermediate_size=256,
                norm_pix_loss=True,
            ),
            128,
            None,
        ),
        "simmim": (dict(TINY_ENCODER, encoder_stride=4), 128, 8),
    },
    "vit-b16": {
        "mae": (dict(norm_pix_loss=True), 128, None),
        "simmim": (dict(image_size=224, patch_size=16, encoder_stride=16), 128, 32),
    },
}
MODELS = {
    "mae": ((ViTMAEConfig, ViTMAEForPreTraining), (ViTMAEMTOConfig, ViTMAEMTOForPreTraining)),
    "simmim": ((ViTConfig, ViTForMaskedImageModeling), (SimMIMMTOConfig, SimMIMMTOForMaskedImageModeling)),
}
VARIANTS = ("upstream", "mto_off", "mto_on")
MTO_WEIGHT = 0.1  # any weight > 0 makes the same work; the library default is 0.003


def build(
    model_name: str, variant: str, config_kwargs: dict, device: torch.device, compile_backend: str | None = None
):
    """The variant's model, in train mode on `device` (compiled with `compile_backend` unless None), and its AdamW."""
    torch.manual_seed(0)
    (upstream_config, upstream_model), (our_config, our_model) = MODELS[model_name]
    if variant == "upstream":
        model = upstream_model(upstream_config(**config_kwargs))
    else:
        model = our_model(our_config(**config_kwargs, use_mto=variant == "mto_on"))
    model.to(device).train()
    if compile_backend is not None:
        model.compile(backend=compile_backend)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer


def autocast(device, autocast_dtype):
    """`torch.autocast` on `device` to `autocast_dtype`, or nothing when it is None (full precision)."""
    return torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)


def make_step(variant: str, model, optimizer, inputs: dict, autocast_dtype):
    device = inputs["pixel_values"].device

    def step():
        with autocast(device, autocast_dtype):
            out = model(**inputs)
            loss = out.loss
            if variant == "mto_on":
                loss = loss + MTO_WEIGHT * (out.sparsity_loss + out.singularity_loss + out.ranking_loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def inputs_for(model_name: str, config_kwargs: dict, batch_size: int, mask_patch_size, device) -> dict:
    """Same images and mask for every variant: MAE gets `noise`, SimMIM a block mask as `bool_masked_pos`."""
    image_size, patch_size = config_kwargs.get("image_size", 224), config_kwargs.get("patch_size", 16)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    if model_name == "mae":
        mask = {"noise": torch.rand(batch_size, (image_size // patch_size) ** 2, generator=generator)}
    else:
        mask = {"bool_masked_pos": simmim_block_mask(batch_size, image_size, patch_size, mask_patch_size, 0.6)}
    return {"pixel_values": pixels.to(device), **{k: v.to(device) for k, v in mask.items()}}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_all(
    model_name,
    config,
    inputs,
    device,
    autocast_dtype,
    warmup: int,
    rounds: int,
    steps_per_round: int,
    compile_backend: str | None = None,
):
    """Per variant: median step seconds, the per-round ratios to upstream, and the peak memory (CUDA: of its own
    model, optimizer and step; CPU: the bytes saved for backward, see `saved_activation_bytes`).

    Each round times every variant back to back, in an order that rotates from round to round, so a ratio taken
    within a round compares steps run seconds apart: the median of those paired ratios is what is reported, as a
    shared machine's drifts between rounds cancel in it where they would not in a ratio of medians.
    """
    # Every model is built before any runs: building a model class that transformers has not seen yet changes a
    # registry that compiled graphs guard on, which would recompile an already warm variant inside the timings.
    built = {variant: build(model_name, variant, config, device, compile_backend) for variant in VARIANTS}
    steps = {variant: make_step(variant, *built[variant], inputs, autocast_dtype) for variant in VARIANTS}
    peaks = {}
    for variant in VARIANTS:
        for _ in range(warmup):
            steps[variant]()
        peaks[variant] = step_memory(steps[variant], *built[variant], device)
    times = timed_rounds(steps, rounds, steps_per_round, device)
    results = {}
    for variant in VARIANTS:
        ratios = [t / base for t, base in zip(times[variant], times["upstream"], strict=True)]
        results[variant] = {
            "step_s": statistics.median(times[variant]),
            "ratio": statistics.median(ratios),
            "ratio_quartiles": statistics.quantiles(ratios, n=4)[::2] if len(ratios) > 1 else [ratios[0]] * 2,
            "peak_bytes": peaks[variant],
        }
    return results


def timed_rounds(runs: dict, rounds: int, steps_per_round: int, device) -> dict[str, list[float]]:
    """Seconds per call of each of ``runs`` (name -> callable), one value per round: each round calls every run
    ``steps_per_round`` times back to back, in an order that rotates from round to round, so that a ratio taken
    within a round compares calls made seconds apart."""
    order = list(runs)
    times = {name: [] for name in order}
    for round_index in range(rounds):
        shift = round_index % len(order)
        for name in order[shift:] + order[:shift]:
            sync(device)
            start = time.perf_counter()
            for _ in range(steps_per_round):
                runs[name]()
            sync(device)
            times[name].append((time.perf_counter() - start) / steps_per_round)
    return times


# Operators that do no arithmetic: views, allocations, and the wrappers whose work is counted in their callees.
NOT_WORK = {
    "aten::view", "aten::slice", "aten::transpose", "aten::as_strided", "aten::expand", "aten::select",
    "aten::unsqueeze", "aten::squeeze", "aten::t", "aten::permute", "aten::alias", "aten::detach", "aten::empty",
    "aten::empty_strided", "aten::empty_like", "aten::to", "aten::lift_fresh", "aten::result_type", "aten::resize_",
    "aten::is_nonzero", "aten::_unsafe_view", "aten::reshape", "aten::split", "aten::narrow", "aten::unbind",
    "aten::_reshape_alias", "aten::resolve_conj", "aten::resolve_neg", "aten::zeros_like", "aten::ones_like",
    "aten::new_zeros", "aten::new_empty",
}  # fmt: skip


def count_operators(run, cuda: bool = False, allow_syncs: bool = False) -> dict[str, int]:
    """Operators ``run()`` calls that do work, counted where they are called (an operator's own calls of others, as
    log_softmax's of _log_softmax, are part of it), and its host reads of a tensor's value; with ``cuda``, also the
    CUDA kernels it launches, and a synchronising call raises unless ``allow_syncs`` (then only the count says)."""
    run()  # warm-up: one-off initialisations (cuBLAS handles, allocator) are not the terms' launches
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        if cuda:
            torch.cuda.set_sync_debug_mode("warn" if allow_syncs else "error")
        try:
            run()
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    events = [e for e in prof.events() if e.name.startswith("aten::")]

    def is_called_by_an_operator(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return True
            parent = parent.cpu_parent
        return False

    def does_work(event) -> bool:
        return event.name not in NOT_WORK or any(does_work(child) for child in event.cpu_children)

    counts = {
        "operators": sum(does_work(e) for e in events if not is_called_by_an_operator(e)),
        "host_reads": sum(e.name == "aten::_local_scalar_dense" for e in events),
    }
    if cuda:
        counts["cuda_kernels"] = sum(e.device_type == DeviceType.CUDA for e in prof.events())
    return counts


def step_memory(step_fn, model, optimizer, device) -> int:
    """CUDA: the bytes of `model`'s parameters, buffers and `optimizer`'s state plus the peak a step allocates on top
    of what was allocated before it; CPU: `saved_activation_bytes`."""
    if device.type != "cuda":
        return saved_activation_bytes(step_fn)
    state = [t for values in optimizer.state.values() for t in values.values() if isinstance(t, torch.Tensor)]
    tensors = [*model.parameters(), *model.buffers(), *state]
    own = sum(t.numel() * t.element_size() for t in tensors if t.device.type == "cuda")
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step_fn()
    sync(device)
    return own + torch.cuda.max_memory_allocated(device) - before


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
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch_size", type=int, default=None, help="Override the preset's batch size.")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps_per_round", type=int, default=4)
    parser.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="BACKEND",
        help="Time every variant under torch.compile (default backend inductor); use enough --warmup steps.",
    )
    parser.add_argument("--json", default=None, help="Also write the results to this JSON file.")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    memory = "peak MiB" if device.type == "cuda" else "saved MiB"
    report = {"preset": args.preset, "device": name, "torch": torch.__version__, "compile": args.compile}
    for model_name in args.models:
        config, batch_size, mask_patch_size = PRESETS[args.preset][model_name]
        batch_size = args.batch_size or batch_size
        inputs = inputs_for(model_name, config, batch_size, mask_patch_size, device)
        results = time_all(
            model_name,
            config,
            inputs,
            device,
            autocast_dtype,
            args.warmup,
            args.rounds,
            args.steps_per_round,
            args.compile,
        )
        compiled = f", compiled ({args.compile})" if args.compile else ""
        print(f"\n{model_name}: preset {args.preset}, batch {batch_size}, {name}, torch {torch.__version__}{compiled}")
        print(f"{'variant':<10} {'step ms':>9} {'x upstream':>11} {'(quartiles)':>14} {memory:>10} {'x upstream':>11}")
        base = results["upstream"]
        for variant in VARIANTS:
            r = results[variant]
            low, high = r["ratio_quartiles"]
            print(
                f"{variant:<10} {r['step_s'] * 1e3:>9.2f} {r['ratio']:>11.3f} {f'{low:.3f}-{high:.3f}':>14} "
                f"{r['peak_bytes'] / 2**20:>10.1f} {r['peak_bytes'] / max(base['peak_bytes'], 1):>11.3f}"
            )
        report[model_name] = {"batch_size": batch_size, **results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
