"""What the MTO terms cost by themselves: operator launches at the ViT-B widths, and time on trained weights.

    python benchmarks/mto_cost.py launches                      # torch operators per MTO forward + backward
    python benchmarks/mto_cost.py launches --device cuda        # and CUDA kernels; a device sync raises
    python benchmarks/mto_cost.py trained CKPT_DIR [CKPT_DIR ...]  # MTO time per checkpoint (and fresh weights)

`launches` runs `mto_terms_visible_first` (the eager path of MAE's decoder and SimMIM's encoder) and `mto_terms` (the
mask-based path `torch.compile` takes) on random states (on `--device`) at the ViT-B presets' widths, forward and
backward, and counts (`step_time.count_operators`) the operators that do work (views and allocations left out), and
the host reads of a tensor's value (`.item()`, `int()` or `bool()` of one: `aten::_local_scalar_dense`, a device
sync on a GPU). The counts do not depend on the batch size. On CUDA it also counts the kernels launched, under
`torch.cuda.set_sync_debug_mode("error")`, so a synchronising call in the MTO terms fails the run.

`trained` loads each MAE + MTO checkpoint (e.g. the `checkpoint-*` folders of a short `recipes/pretrain.py` run),
takes its decoder states on one fixed batch of Fashion-MNIST-like inputs, and times the MTO terms alone (forward and
backward, the weighted sum of L_spa, L_e and L_r), with the same model freshly initialised as the first row. Each
row also gives the span of the affinity logits of a row (max - min, median over rows, last layer) and how many
probabilities `exp(log p)` fall below float32's normal range. Run it on one thread (`OMP_NUM_THREADS=1`): on a
shared machine an oversubscribed thread pool makes the timings meaningless.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from step_time import count_operators

from hf_mto import ViTMAEMTOConfig, ViTMAEMTOForPreTraining
from hf_mto.data import DEFAULT_FASHION_MNIST_DIR
from hf_mto.mto import affinity_logits, mto_terms, mto_terms_visible_first

# (states = blocks + 1, patches, width, masked patches) of the MTO stack at the ViT-B presets: MAE's 512-d, 8-block
# decoder at mask ratio 0.75, SimMIM's encoder at 0.6 (the CLS token comes first in both).
WIDTHS = {"mae_vit_b_decoder": (9, 196, 512, 147), "simmim_vit_b": (13, 196, 768, 118)}


def _states(num_states: int, num_patches: int, width: int, device: str, batch_size: int = 2) -> list[torch.Tensor]:
    torch.manual_seed(0)
    shape = (batch_size, 1 + num_patches, width)
    return [torch.randn(shape, device=device, requires_grad=True) for _ in range(num_states)]


def _mto_loss(terms) -> torch.Tensor:
    return terms.sparsity_loss + terms.singularity_loss + terms.ranking_loss


def _launch_counts(
    num_states: int, num_patches: int, width: int, num_masked: int, device: str = "cpu"
) -> dict[str, dict[str, int]]:
    """`count_operators` of both MTO paths, forward and backward, on random states of that stack."""
    states = _states(num_states, num_patches, width, device)
    mask = torch.zeros(states[0].shape[0], num_patches, dtype=torch.bool, device=device)
    mask[:, num_patches - num_masked :] = True

    def visible_first():
        _mto_loss(mto_terms_visible_first(states, num_patches - num_masked, num_prefix_tokens=1)).backward()

    def mask_based():
        _mto_loss(mto_terms([state[:, 1:] for state in states], mask)).backward()

    cuda = torch.device(device).type == "cuda"
    return {"visible_first": count_operators(visible_first, cuda), "mask_based": count_operators(mask_based, cuda)}


def launches(device: str) -> dict:
    report = {}
    for name, stack in WIDTHS.items():
        report[name] = _launch_counts(*stack, device=device)
        for path, counts in report[name].items():
            kernels = f"  {counts['cuda_kernels']} CUDA kernels" if "cuda_kernels" in counts else ""
            print(
                f"{name:<18} {path:<13} {counts['operators']:>4} operators  {counts['host_reads']} host reads{kernels}"
            )
    return report


def _fashion_like_batch(image_size: int, batch_size: int = 128) -> torch.Tensor:
    """Fashion-MNIST images as the tiny recipe feeds them (3 channels, normalised), or noise if it is not installed."""
    import gzip
    from pathlib import Path

    path = Path(DEFAULT_FASHION_MNIST_DIR) / "train-images-idx3-ubyte.gz"
    if not path.exists():
        return torch.randn(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    raw = torch.frombuffer(bytearray(gzip.open(path).read()[16 : 16 + batch_size * 784]), dtype=torch.uint8)
    images = raw.float().div(255).view(batch_size, 1, 28, 28)
    images = torch.nn.functional.interpolate(images, size=image_size, mode="bilinear")
    return images.sub(0.5).div(0.5).expand(-1, 3, -1, -1).contiguous()


def time_mto(model, pixel_values: torch.Tensor, repeats: int) -> dict:
    """Median seconds of the MTO terms' forward + backward on `model`'s decoder states, and what explains them."""
    config = model.config
    torch.manual_seed(0)
    with torch.no_grad():
        encoded = model.vit(pixel_values)
        decoded = model.decoder(encoded.last_hidden_state, encoded.ids_restore, output_hidden_states=True)
    states = [state.detach().requires_grad_() for state in decoded.hidden_states]
    num_visible = encoded.last_hidden_state.shape[1] - 1
    settings = dict(spa_layers=config.mto_spa_layers, affinity=config.mto_affinity, temperature=config.mto_temperature)

    def run():
        _mto_loss(mto_terms_visible_first(states, num_visible, num_prefix_tokens=1, **settings)).mul(0.003).backward()

    run()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    with torch.no_grad():
        logits = affinity_logits(states[-1][:, 1:], config.mto_affinity, config.mto_temperature)
        log_p = torch.log_softmax(logits, dim=-1)
    tiny = torch.finfo(torch.float32).tiny
    return {
        "mto_ms": statistics.median(seconds) * 1e3,
        "logit_span": (logits.amax(-1) - logits.amin(-1)).median().item(),
        "below_normal": (log_p < torch.tensor(tiny).log()).float().mean().item(),
    }


def trained(checkpoints: list[str], repeats: int) -> dict:
    first = ViTMAEMTOForPreTraining.from_pretrained(checkpoints[0])
    torch.manual_seed(0)
    models = {"fresh": ViTMAEMTOForPreTraining(ViTMAEMTOConfig.from_dict(first.config.to_dict()))}
    models.update({path: ViTMAEMTOForPreTraining.from_pretrained(path) for path in checkpoints})
    pixel_values = _fashion_like_batch(first.config.image_size)
    report = {}
    print(f"{'weights':<40} {'MTO ms':>8} {'logit span':>11} {'p < normal':>11}")
    for name, model in models.items():
        report[name] = row = time_mto(model.eval(), pixel_values, repeats)
        print(f"{name:<40} {row['mto_ms']:>8.2f} {row['logit_span']:>11.1f} {row['below_normal']:>11.2e}")
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("launches", "trained"))
    parser.add_argument("checkpoints", nargs="*", help="`trained`: MAE + MTO checkpoint folders, in training order.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="`launches`.")
    parser.add_argument("--repeats", type=int, default=20, help="`trained`: timed runs per checkpoint.")
    args = parser.parse_args(argv)
    if args.part == "launches":
        return launches(args.device)
    if not args.checkpoints:
        parser.error("`trained` needs at least one checkpoint folder")
    return trained(args.checkpoints, args.repeats)


if __name__ == "__main__":
    main()
