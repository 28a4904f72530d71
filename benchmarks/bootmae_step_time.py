"""Training-step time and memory of a pre-training preset with MTO off and on, and the momentum encoder's share.

`step_time.py` compares ours with upstream; BootMAE has no upstream, so here the reference is the same preset with
MTO off. A step is what `MTOTrainer` runs: forward with the preset's masking, loss plus the weighted MTO terms of every
stack (MTO on), backward, AdamW step, then the method's `on_step_end` (BootMAE: the momentum encoder's EMA step).

For a model with a momentum encoder (`teacher_features`: BootMAE, ConMIM) the teacher's part of the step is timed on its own
in the same rounds: its forward on the full image plus the EMA step (`on_step_end`), reported as a fraction of each
variant's step (median of the ratios paired within a round). Memory as in `step_time.py`: on CUDA the variant's own
peak, on CPU the bytes autograd saves for the backward pass (the teacher, run without grad, saves none), plus the
teacher's own parameter bytes.

    python benchmarks/bootmae_step_time.py                       # the tiny BootMAE preset, its batch (128)
    python benchmarks/bootmae_step_time.py --rounds 30 --json out.json
    python benchmarks/bootmae_step_time.py --preset recipes/configs/vit_base_bootmae_mto_in1k.yaml --batch_size 128 \
        --bf16                                                   # a GPU: ViT-B/16, as benchmarks/gpu_check.py
    python benchmarks/bootmae_step_time.py --preset recipes/configs/vit_base_conmim_mto_in1k.yaml --batch_size 128 \
        --bf16                                                   # ConMIM's ViT-B/16, as benchmarks/gpu_check.py
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from step_time import autocast, saved_activation_bytes, step_memory, timed_rounds

from hf_mto.cli import ModelArguments, build_config, parse_args
from hf_mto.data import DataArguments
from hf_mto.masking import MaskGenerator, square_side
from hf_mto.methods import method_for
from hf_mto.training_args import MTOTrainingArguments

DEFAULT_PRESET = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "tiny_cpu_bootmae_mto.yaml"
VARIANTS = ("mto_off", "mto_on")
TEACHER = "teacher"  # the momentum encoder's forward on the full image plus the EMA step
PROGRESS = 0.5  # training progress passed to on_step_end: any value does the same work


def load_preset(path, batch_size: int | None = None):
    """The preset's config, MTO weights and masking, and a batch (of the preset's size unless `batch_size` is given)
    with its masks (as the trainer's)."""
    model_args, _, training_args = parse_args(
        (ModelArguments, DataArguments, MTOTrainingArguments), ["--config", str(path), "--report_to", "none"]
    )
    config = build_config(model_args)
    method = method_for(model_args.model_type)
    batch_size = batch_size or training_args.per_device_train_batch_size
    strategy = training_args.masking or method.default_masking
    image_side, patch_side = square_side(config.image_size), square_side(config.patch_size)
    generator = MaskGenerator(strategy, image_side, patch_side, config.mask_ratio, training_args.mask_patch_size)
    torch.manual_seed(0)
    pixels = torch.randn(batch_size, config.num_channels, image_side, image_side)
    mask = generator(batch_size, device=torch.device("cpu"))
    return config, method, training_args.mto_weights(), pixels, mask, strategy


def build(method, config, use_mto: bool, device):
    torch.manual_seed(0)
    model = method.model_class(type(config).from_dict({**config.to_dict(), "use_mto": use_mto}))
    model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer


def make_step(method, model, optimizer, inputs: dict, weights: dict, use_mto: bool, autocast_dtype=None):
    device = inputs["pixel_values"].device

    def step():
        with autocast(device, autocast_dtype):
            out = model(**inputs, use_mto=use_mto)
            loss = out.loss
            if use_mto:
                for terms in method.mto_outputs(out).values():
                    loss = loss + sum(weight * getattr(terms, name) for name, weight in weights.items() if weight > 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.on_step_end(model, PROGRESS)

    return step


def make_teacher_part(method, model, pixel_values, autocast_dtype=None):
    def teacher_part():
        with autocast(pixel_values.device, autocast_dtype):
            model.teacher_features(pixel_values)
        method.on_step_end(model, PROGRESS)

    return teacher_part


def measure(
    path, device, warmup: int, rounds: int, steps_per_round: int, autocast_dtype=None, batch_size: int | None = None
) -> dict:
    """Step time and memory per variant (and the teacher's share); `autocast_dtype` (e.g. torch.bfloat16) runs the
    forward under autocast, `batch_size` overrides the preset's."""
    config, method, weights, pixels, mask, strategy = load_preset(path, batch_size)
    pixels = pixels.to(device)
    built = {variant: build(method, config, variant == "mto_on", device) for variant in VARIANTS}
    inputs = {"pixel_values": pixels, **method.mask_inputs(built["mto_off"][0], mask.to(device))}
    runs = {v: make_step(method, *built[v], inputs, weights, v == "mto_on", autocast_dtype) for v in VARIANTS}
    has_teacher = hasattr(built["mto_off"][0], "teacher_features")
    if has_teacher:
        runs[TEACHER] = make_teacher_part(method, built["mto_off"][0], pixels, autocast_dtype)
    peaks = {}
    for name, run in runs.items():
        for _ in range(warmup):
            run()
        if name in built:
            peaks[name] = step_memory(run, *built[name], device)
    times = timed_rounds(runs, rounds, steps_per_round, device)

    def paired(numerator, denominator):
        ratios = [a / b for a, b in zip(times[numerator], times[denominator], strict=True)]
        quartiles = statistics.quantiles(ratios, n=4)[::2] if len(ratios) > 1 else [ratios[0]] * 2
        return statistics.median(ratios), quartiles

    precision = str(autocast_dtype).removeprefix("torch.") if autocast_dtype else "fp32"
    results = {"batch_size": pixels.shape[0], "masking": strategy, "precision": precision, "mto_weights": weights}
    results["variants"] = {}
    for variant in VARIANTS:
        ratio, quartiles = paired(variant, "mto_off")
        entry = {"step_s": statistics.median(times[variant]), "ratio": ratio, "ratio_quartiles": quartiles}
        entry["peak_bytes"] = peaks[variant]
        if has_teacher:
            entry["teacher_share"], entry["teacher_share_quartiles"] = paired(TEACHER, variant)
        results["variants"][variant] = entry
    if has_teacher:
        teacher = built["mto_off"][0].teacher
        results["teacher_s"] = statistics.median(times[TEACHER])
        results["teacher_param_bytes"] = sum(p.numel() * p.element_size() for p in teacher.parameters())
        results["teacher_saved_bytes"] = saved_activation_bytes(runs[TEACHER])
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=str(DEFAULT_PRESET), help="A pre-training preset (recipes/configs).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps_per_round", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=None, help="Instead of the preset's batch size.")
    parser.add_argument("--bf16", action="store_true", help="Forward under bf16 autocast (default: fp32).")
    parser.add_argument("--json", default=None, help="Also write the results to this JSON file.")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    memory = "peak MiB" if device.type == "cuda" else "saved MiB"
    autocast_dtype = torch.bfloat16 if args.bf16 else None
    results = measure(
        args.preset, device, args.warmup, args.rounds, args.steps_per_round, autocast_dtype, args.batch_size
    )
    report = {"preset": args.preset, "device": name, "torch": torch.__version__, **results}
    print(
        f"\n{Path(args.preset).name}: batch {results['batch_size']}, {results['masking']} masking, "
        f"{results['precision']}, {name}, "
        f"torch {torch.__version__}, {args.rounds} rounds x {args.steps_per_round} steps"
    )
    print(
        f"{'variant':<8} {'step ms':>9} {'x mto_off':>10} {'(quartiles)':>14} {memory:>10} {'x mto_off':>10}"
        f"{'teacher share':>15} {'(quartiles)':>14}"
    )
    base = results["variants"]["mto_off"]
    for variant, r in results["variants"].items():
        low, high = r["ratio_quartiles"]
        line = (
            f"{variant:<8} {r['step_s'] * 1e3:>9.2f} {r['ratio']:>10.3f} {f'{low:.3f}-{high:.3f}':>14} "
            f"{r['peak_bytes'] / 2**20:>10.1f} {r['peak_bytes'] / max(base['peak_bytes'], 1):>10.3f}"
        )
        if "teacher_share" in r:
            low, high = r["teacher_share_quartiles"]
            line += f"{r['teacher_share']:>15.3f} {f'{low:.3f}-{high:.3f}':>14}"
        print(line)
    if "teacher_s" in results:
        print(
            f"teacher (forward on the full image + EMA step): {results['teacher_s'] * 1e3:.2f} ms, "
            f"{results['teacher_param_bytes'] / 2**20:.2f} MiB of parameters, "
            f"{results['teacher_saved_bytes'] / 2**20:.1f} MiB saved for backward"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
