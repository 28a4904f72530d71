"""Heterogeneity analysis (MTO paper, Section 3: Table 1, Fig. 1 and 2) and reconstruction pictures.

For a pre-trained hf_mto model (of any registered method, `hf_mto.methods`: `ViTMAEMTOForPreTraining`, whose MTO
stack is the decoder, `SimMIMMTOForMaskedImageModeling`, the encoder) and a set of images:

- `analyze_heterogeneity` measures, per layer l = 0..L of that stack, the heterogeneity H^l (Eq. 2: mean over masked
  tokens of the entropy of their affinity over the visible tokens) averaged over the images, whatever the checkpoint's
  `use_mto` says: the states are taken from the forward and the math is `hf_mto.mto`'s. `HeterogeneityResult.table()`
  prints it as the paper's Table 1; `plot_heterogeneity` draws Fig. 1 (a).
- `affinity_maps` / `plot_affinity_maps` draw Fig. 2: for one image, each layer's N x N affinity (row-wise softmax of
  the config's `mto_affinity` logits over all tokens) with rows and columns ordered masked tokens first.
- `reconstruct` / `plot_reconstructions` draw original / masked / reconstruction / reconstruction with the visible
  patches pasted back (as the official MAE visualisation does), un-normalised to [0, 1].
- `ReconstructionCallback` writes those pictures at every evaluation of a Trainer, and to TensorBoard.

Masks come from the method's default masking (MAE: its own uniform noise, SimMIM: `simmim_block`) or any
`hf_mto.masking` strategy, drawn from a seeded generator, so every number and picture here is reproducible. What
differs between methods (the mask input, the forward that yields the MTO stack's states and the reconstruction) is
the method's declaration.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from transformers import TrainerCallback

from .checkpoints import load_pretraining_checkpoint
from .data import collate_pixel_values, first_readable_pixels
from .evaluation import unsharded_model
from .masking import MaskGenerator, square_side
from .methods import PreTrainingMethod, method_for, registered_methods
from .mto import affinity_logits, has_masked_and_visible, mean_row_entropy

# Grey that masked patches are drawn with, in display space [0, 1].
MASKED_GREY = 0.5


# --------------------------------------------------------------------------------------------------------------------
# Models and masks
# --------------------------------------------------------------------------------------------------------------------


def check_model(model) -> type[PreTrainingMethod]:
    """The method of `model`; a `ValueError` unless it is one of hf_mto's pre-training models. An upstream model a
    method extends is refused too (its forward has no MTO switch and its config no affinity): `load_checkpoint` loads
    its checkpoint into ours."""
    ours = tuple(method.model_class for method in registered_methods())
    if not isinstance(model, ours):
        raise ValueError(
            f"analysis needs one of hf_mto's pre-training models ({', '.join(cls.__name__ for cls in ours)}), got "
            f"{type(model).__name__}"
        )
    return method_for(model)


def load_checkpoint(checkpoint: str | os.PathLike, **kwargs):
    """Load a pre-training checkpoint (local path or Hub id) in eval mode: one of hf_mto's, or an upstream one (the
    Hub's official MAE, anything `ViTMAEForPreTraining` / `ViTForMaskedImageModeling` saved) into the model of ours
    that extends its class, so official models can be analysed (the paper's Table 1).

    Raises:
        ValueError: the checkpoint is of another model type.
        IncompleteCheckpointError: it lacks weights of the model (e.g. a `vit` classifier, which has no SimMIM head).
    """
    return load_pretraining_checkpoint(checkpoint, **kwargs).eval()


def mto_stack(model, stack: str | None = None) -> str:
    """The MTO stack the analysis looks at: ``stack`` when given (one of the method's `mto_stacks`), else the first
    (MAE: ``"decoder"``, SimMIM: ``"encoder"``).

    Raises:
        ValueError: naming ``stack`` and the method's stacks.
    """
    stacks = check_model(model).mto_stacks
    if stack is None:
        return stacks[0]
    if stack not in stacks:
        raise ValueError(f"stack {stack!r} is not an MTO stack of {type(model).__name__}; its stacks: {list(stacks)}")
    return stack


def default_mask_patch_size(image_size: int, patch_size: int) -> int:
    """SimMIM's mask-square side for an image: 32 px (SimMIM's) when the image holds at least 2 x 2 such squares,
    else a quarter of the image (the tiny presets' 8 px at 32 px), else the patch size."""
    for candidate in (32, image_size // 4):
        if candidate >= patch_size and candidate % patch_size == 0 and image_size % candidate == 0:
            if image_size // candidate >= 2:
                return candidate
    return patch_size


def draw_mask_inputs(
    model,
    batch_size: int,
    generator: torch.Generator | None = None,
    masking: str | None = None,
    mask_patch_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """The masking argument(s) of one forward for ``batch_size`` images, drawn on the CPU from `generator`: the
    method's `mask_inputs` (MAE: ``{"noise": [B, N]}``, SimMIM: ``{"bool_masked_pos": [B, N]}``), or its
    `own_mask_inputs` for the masking the model draws itself.

    Args:
        masking: a strategy of `hf_mto.masking.MaskGenerator`; default the method's `default_masking` (MAE: its own
            uniform noise, SimMIM: ``simmim_block``).
        mask_patch_size: side of SimMIM's squares in pixels; default `default_mask_patch_size`.
    """
    method = check_model(model)
    strategy = masking or method.default_masking
    if strategy == method.own_masking:
        return method.own_mask_inputs(model, batch_size, generator)
    config = model.config
    image_size, patch_size = square_side(config.image_size), square_side(config.patch_size)
    masks = MaskGenerator(
        strategy,
        image_size,
        patch_size,
        config.mask_ratio,
        mask_patch_size or default_mask_patch_size(image_size, patch_size),
    )(batch_size, generator=generator)
    return method.mask_inputs(model, masks)


@dataclass
class ModelPass:
    """What the analysis needs from one forward.

    Attributes:
        states: per MTO stack, L+1 tensors ``[B, N, D]`` float32, H^0..H^L, patch tokens in patch (raster) order.
        mask: ``[B, N]`` bool, True = masked.
        prediction: ``[B, C, H, W]`` float32 reconstruction in the image processor's normalised space (MAE's
            per-patch normalisation, with `norm_pix_loss`, already undone from the original image's patches).
    """

    states: dict[str, list[torch.Tensor]]
    mask: torch.Tensor
    prediction: torch.Tensor


@torch.no_grad()
def run_model(model, pixel_values: torch.Tensor, mask_inputs: dict[str, torch.Tensor]) -> ModelPass:
    """One no-grad forward (the method's `analysis_pass`) returning the states of each MTO stack, the mask and the
    reconstruction; ``pixel_values`` ``[B, C, H, W]``, ``mask_inputs`` as `draw_mask_inputs` gives them."""
    method = check_model(model)
    parameter = next(model.parameters())
    pixel_values = pixel_values.to(parameter.device, parameter.dtype)
    mask_inputs = {name: value.to(parameter.device) for name, value in mask_inputs.items()}
    states, mask, prediction = method.analysis_pass(model, pixel_values, mask_inputs)
    return ModelPass(states=states, mask=mask, prediction=prediction)


# --------------------------------------------------------------------------------------------------------------------
# Heterogeneity (Table 1, Fig. 1)
# --------------------------------------------------------------------------------------------------------------------


def layer_entropies(
    states: Sequence[torch.Tensor], mask: torch.Tensor, affinity: str = "cosine", temperature: float = 0.1
) -> dict[str, torch.Tensor]:
    """Per layer and image: ``"heterogeneity"`` (Eq. 2, masked rows over visible columns, = `mto.heterogeneity`)
    and ``"sparsity_loss"`` (the entropy L_spa averages, Eq. 3: visible rows over all columns), each
    ``[L+1, B]``; each layer's affinity logits are computed once."""
    every = torch.ones_like(mask)
    heterogeneity, visible = [], []
    for state in states:
        logits = affinity_logits(state, affinity, temperature)
        heterogeneity.append(mean_row_entropy(logits, rows=mask, cols=~mask))
        visible.append(mean_row_entropy(logits, rows=~mask, cols=every))
    return {"heterogeneity": torch.stack(heterogeneity), "sparsity_loss": torch.stack(visible)}


@dataclass
class HeterogeneityResult:
    """Per-layer heterogeneity of a model over a set of images (the paper's Table 1 row for one model).

    Lists have L+1 entries, layer 0 being the initial embedding (MAE: the decoder input after mask-token insertion
    and position embedding; SimMIM: the embeddings output), layer l the output of block l.
    """

    model_type: str
    stack: str
    num_images: int
    num_tokens: int
    num_masked: float
    heterogeneity: list[float]
    heterogeneity_std: list[float]
    sparsity_loss: list[float]
    uniform_entropy: float
    masking: str
    mask_patch_size: int | None
    seed: int
    affinity: str
    temperature: float
    extra: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.heterogeneity) - 1

    def to_dict(self) -> dict:
        return asdict(self)

    def save_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def table(self) -> str:
        """The paper's Table 1 for this model, one row per layer."""
        header = f"{'layer depth':>11} | {'heterogeneity H':>15} | {'std':>6} | {'L_spa entropy':>15}"
        lines = [
            f"{self.model_type} ({self.stack}), {self.num_images} images, {self.num_masked:g} of {self.num_tokens} "
            f"tokens masked ({self.masking}), affinity {self.affinity}",
            header,
            "-" * len(header),
        ]
        for layer, (h, s, v) in enumerate(
            zip(self.heterogeneity, self.heterogeneity_std, self.sparsity_loss, strict=True)
        ):
            lines.append(f"{layer:>11} | {h:>15.4f} | {s:>6.3f} | {v:>15.4f}")
        lines.append(f"uniform over the visible tokens: H = log(V) = {self.uniform_entropy:.4f}")
        lines.append("layer depth  " + " ".join(f"{layer:>5}" for layer in range(len(self.heterogeneity))))
        lines.append("H            " + " ".join(f"{h:>5.2f}" for h in self.heterogeneity))
        return "\n".join(lines)


def _batches(images, batch_size: int) -> Iterator[torch.Tensor]:
    """``[B, C, H, W]`` batches of a tensor of images or of a dataset whose items hold ``"pixel_values"``."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"images must be [num_images, C, H, W], got shape {list(images.shape)}")
        yield from images.split(batch_size)
        return
    loader = torch.utils.data.DataLoader(images, batch_size=batch_size, collate_fn=collate_pixel_values)
    for batch in loader:
        yield batch["pixel_values"]


def analyze_heterogeneity(
    model,
    images,
    batch_size: int = 64,
    seed: int = 0,
    masking: str | None = None,
    mask_patch_size: int | None = None,
    stack: str | None = None,
) -> HeterogeneityResult:
    """Heterogeneity H^0..H^L of one of `model`'s MTO stacks, averaged over `images` with seeded masks.

    Args:
        model: one of hf_mto's pre-training models (MTO on or off in its config).
        images: ``[M, C, H, W]`` normalised pixels, or a dataset whose items hold ``"pixel_values"`` (as
            `hf_mto.data.apply_transform` gives).
        seed: seed of the masks (drawn on the CPU, so the result does not depend on the device).
        masking, mask_patch_size: see `draw_mask_inputs`.
        stack: one of the method's `mto_stacks`; default the first (see `mto_stack`).

    Images without a masked or a visible token (none with hf_mto's generators) are left out of the means.
    """
    method = check_model(model)
    stack = mto_stack(model, stack)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    per_image = {"heterogeneity": [], "sparsity_loss": []}
    log_visible, masked_counts, num_tokens = [], [], 0
    for pixels in _batches(images, batch_size):
        mask_inputs = draw_mask_inputs(model, pixels.shape[0], generator, masking, mask_patch_size)
        model_pass = run_model(model, pixels, mask_inputs)
        valid = has_masked_and_visible(model_pass.mask).cpu()
        states = model_pass.states[stack]
        entropies = layer_entropies(states, model_pass.mask, config.mto_affinity, config.mto_temperature)
        for name, values in entropies.items():
            per_image[name].append(values.cpu()[:, valid])
        mask = model_pass.mask.cpu()[valid]
        num_tokens = mask.shape[1]
        masked_counts.append(mask.sum(dim=1).float())
        log_visible.append((~mask).sum(dim=1).float().log())
    if not masked_counts or sum(len(c) for c in masked_counts) == 0:
        raise ValueError("no image to analyse: the dataset is empty or no image had both masked and visible tokens")
    heterogeneity = torch.cat(per_image["heterogeneity"], dim=1)  # [L+1, M]
    visible = torch.cat(per_image["sparsity_loss"], dim=1)
    strategy = masking or method.default_masking
    image_size, patch_size = square_side(config.image_size), square_side(config.patch_size)
    return HeterogeneityResult(
        model_type=config.model_type,
        stack=stack,
        num_images=heterogeneity.shape[1],
        num_tokens=num_tokens,
        num_masked=float(torch.cat(masked_counts).mean()),
        heterogeneity=heterogeneity.mean(dim=1).tolist(),
        heterogeneity_std=heterogeneity.std(dim=1, correction=0).tolist(),
        sparsity_loss=visible.mean(dim=1).tolist(),
        uniform_entropy=float(torch.cat(log_visible).mean()),
        masking=strategy,
        mask_patch_size=(mask_patch_size or default_mask_patch_size(image_size, patch_size))
        if strategy == "simmim_block"
        else None,
        seed=seed,
        affinity=config.mto_affinity,
        temperature=float(config.mto_temperature),
    )


def plot_heterogeneity(result: HeterogeneityResult, path: str | os.PathLike) -> Path:
    """Fig. 1 (a) for one model: heterogeneity against layer depth, as a PNG."""
    layers = np.arange(len(result.heterogeneity))
    fig = Figure(figsize=(5.0, 3.4))
    ax = fig.subplots()
    h, s = np.array(result.heterogeneity), np.array(result.heterogeneity_std)
    ax.plot(layers, h, marker="o", label="heterogeneity H (masked -> visible)")
    ax.fill_between(layers, h - s, h + s, alpha=0.2, label="+/- 1 std over images")
    ax.plot(layers, result.sparsity_loss, marker="s", linestyle="--", label="visible -> all entropy (L_spa)")
    ax.axhline(result.uniform_entropy, color="grey", linestyle=":", label="log V (uniform over visible)")
    ax.set_xlabel(f"layer depth ({result.stack}; 0 = initial embedding)")
    ax.set_ylabel("entropy (nats)")
    ax.set_xticks(layers)
    ax.set_title(f"{result.model_type}: heterogeneity over {result.num_images} images", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)


# --------------------------------------------------------------------------------------------------------------------
# Affinity maps (Fig. 2)
# --------------------------------------------------------------------------------------------------------------------


def masked_first_order(mask: torch.Tensor) -> torch.Tensor:
    """``[N]`` bool mask -> ``[N]`` token order with the masked tokens first, each group in patch order."""
    if mask.dim() != 1 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a 1-D bool tensor, got {mask.dtype} of shape {list(mask.shape)}")
    return torch.argsort((~mask).to(torch.uint8), stable=True)


def _check_layers(layers: Iterable[int] | None, num_states: int) -> list[int]:
    if layers is None:
        return list(range(num_states))
    layers = list(layers)
    bad = [layer for layer in layers if not 0 <= layer < num_states]
    if bad or not layers:
        raise ValueError(f"layers {layers} must be a non-empty list of layer depths in [0, {num_states - 1}]")
    return layers


def affinity_maps(
    states: Sequence[torch.Tensor],
    mask: torch.Tensor,
    index: int = 0,
    layers: Iterable[int] | None = None,
    affinity: str = "cosine",
    temperature: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Fig. 2: the affinity ψ(X Xᵀ) (row-wise softmax over all tokens) of image `index` at each of `layers`, with
    rows and columns ordered masked tokens first.

    Returns:
        ``(maps [len(layers), N, N], order [N], num_masked)``: ``maps[k][i, j]`` is the affinity of token
        ``order[i]`` to token ``order[j]``; the first ``num_masked`` tokens are the masked ones.
    """
    batch = mask.shape[0]
    if not 0 <= index < batch:
        raise ValueError(f"image index {index} out of range for a batch of {batch}")
    layers = _check_layers(layers, len(states))
    order = masked_first_order(mask[index]).to(states[0].device)
    maps = []
    for layer in layers:
        logits = affinity_logits(states[layer][index : index + 1], affinity, temperature)[0]
        probs = torch.softmax(logits, dim=-1)
        maps.append(probs[order][:, order])
    return torch.stack(maps).cpu(), order.cpu(), int(mask[index].sum())


def to_display(pixels: torch.Tensor, image_mean: Sequence[float], image_std: Sequence[float]) -> np.ndarray:
    """Normalised ``[B, C, H, W]`` pixels -> ``[B, H, W, 3]`` float array in [0, 1] (grayscale repeated)."""
    mean = torch.as_tensor(image_mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.as_tensor(image_std, dtype=torch.float32).view(1, -1, 1, 1)
    images = (pixels.detach().float().cpu() * std + mean).clamp(0, 1)
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    return images.permute(0, 2, 3, 1).numpy()


def patch_mask_to_pixels(mask: torch.Tensor, image_size: int, patch_size: int) -> torch.Tensor:
    """``[B, N]`` patch mask -> ``[B, 1, H, W]`` float pixel mask (1 = masked)."""
    grid = image_size // patch_size
    if mask.shape[1] != grid * grid:
        raise ValueError(
            f"mask has {mask.shape[1]} patches, expected {grid * grid} for {image_size} px / {patch_size}"
        )
    pixels = mask.float().view(-1, 1, grid, grid)
    return pixels.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)


def plot_affinity_maps(
    maps: torch.Tensor,
    num_masked: int,
    path: str | os.PathLike,
    layers: Sequence[int] | None = None,
    image: np.ndarray | None = None,
    heterogeneity: Sequence[float] | None = None,
    title: str | None = None,
) -> Path:
    """Draw Fig. 2: one panel per layer, each min-max normalised (as the paper), with lines between the masked
    (first `num_masked`) and the visible tokens. `image` (``[H, W, 3]`` in [0, 1], masked patches drawn grey) adds
    a first panel; `heterogeneity` (one per map) goes in the titles."""
    layers = list(range(len(maps))) if layers is None else list(layers)
    if len(layers) != len(maps) or (heterogeneity is not None and len(heterogeneity) != len(maps)):
        raise ValueError(
            f"got {len(maps)} maps but {len(layers)} layers"
            + ("" if heterogeneity is None else f" and {len(heterogeneity)} heterogeneity values")
        )
    panels = len(maps) + (image is not None)
    rows = math.ceil(panels / 7)  # at most 7 panels a row, rows as even as they can be
    columns = math.ceil(panels / rows)
    fig = Figure(figsize=(2.6 * columns, 2.7 * rows + (0.3 if title else 0)))
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    for ax in axes:
        ax.axis("off")
    k = 0
    if image is not None:
        axes[0].imshow(image)
        axes[0].set_title("image (masked grey)", fontsize=8)
        k = 1
    for n, (layer, matrix) in enumerate(zip(layers, maps, strict=True)):
        ax = axes[k + n]
        values = matrix.float().numpy()
        span = values.max() - values.min()
        values = (values - values.min()) / span if span > 0 else np.zeros_like(values)
        ax.imshow(values, cmap="viridis", interpolation="nearest")
        for line in (ax.axhline, ax.axvline):
            line(num_masked - 0.5, color="red", linewidth=0.8)
        label = f"layer {layer}" + (" (embedding)" if layer == 0 else "")
        if heterogeneity is not None:
            label += f"\nH = {heterogeneity[n]:.3f}"
        ax.set_title(label, fontsize=8)
        ax.axis("on")
        ax.set_xticks([num_masked / 2, num_masked + (len(values) - num_masked) / 2], ["M", "V"], fontsize=7)
        ax.set_yticks([num_masked / 2, num_masked + (len(values) - num_masked) / 2], ["M", "V"], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)


def analyze_affinity(
    model,
    pixel_values: torch.Tensor,
    path: str | os.PathLike,
    seed: int = 0,
    layers: Iterable[int] | None = None,
    masking: str | None = None,
    mask_patch_size: int | None = None,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    stack: str | None = None,
) -> dict:
    """Fig. 2 for one image (``pixel_values [C, H, W]`` or ``[1, C, H, W]``): the affinity maps of `layers`
    (default all) of an MTO stack (default the first, see `mto_stack`), masked tokens first, written to `path`.
    Returns the order, the mask and each layer's H."""
    stack = mto_stack(model, stack)
    if pixel_values.dim() == 3:
        pixel_values = pixel_values.unsqueeze(0)
    if pixel_values.dim() != 4 or pixel_values.shape[0] != 1:
        raise ValueError(f"pixel_values must be one image [C, H, W], got shape {list(pixel_values.shape)}")
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    model_pass = run_model(model, pixel_values, draw_mask_inputs(model, 1, generator, masking, mask_patch_size))
    states = model_pass.states[stack]
    layers = _check_layers(layers, len(states))
    maps, order, num_masked = affinity_maps(
        states, model_pass.mask, 0, layers, config.mto_affinity, config.mto_temperature
    )
    entropies = layer_entropies(states, model_pass.mask, config.mto_affinity, config.mto_temperature)
    heterogeneity = [float(entropies["heterogeneity"][layer, 0]) for layer in layers]
    image = None
    if image_mean is not None and image_std is not None:
        image = to_display(pixel_values, image_mean, image_std)[0]
        image_size, patch_size = pixel_values.shape[-1], square_side(config.patch_size)
        hidden = patch_mask_to_pixels(model_pass.mask.cpu(), image_size, patch_size)[0, 0].numpy() > 0
        image[hidden] = MASKED_GREY
    plot_affinity_maps(
        maps,
        num_masked,
        path,
        layers=layers,
        image=image,
        heterogeneity=heterogeneity,
        title=f"{config.model_type} {stack}: affinity, masked tokens first ({num_masked} of {len(order)})",
    )
    return {
        "layers": layers,
        "order": order.tolist(),
        "num_masked": num_masked,
        "mask": model_pass.mask[0].cpu().tolist(),
        "heterogeneity": heterogeneity,
    }


# --------------------------------------------------------------------------------------------------------------------
# Reconstructions
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Reconstructions:
    """Display images ``[B, H, W, 3]`` in [0, 1]: the original, the masked input (masked patches grey), the
    reconstruction, and the reconstruction with the visible patches replaced by the original's."""

    original: np.ndarray
    masked: np.ndarray
    reconstruction: np.ndarray
    composite: np.ndarray

    COLUMNS = ("original", "masked", "reconstruction", "reconstruction + visible")

    def panels(self) -> tuple[np.ndarray, ...]:
        return self.original, self.masked, self.reconstruction, self.composite

    def grid(self, pad: int = 2) -> np.ndarray:
        """All panels as one ``[rows*(H+pad)+pad, 4*(W+pad)+pad, 3]`` uint8 image (one row per image), e.g. for
        TensorBoard."""
        batch, height, width, _ = self.original.shape
        out = np.ones((batch * (height + pad) + pad, 4 * (width + pad) + pad, 3), dtype=np.float32)
        for column, images in enumerate(self.panels()):
            for row in range(batch):
                top, left = pad + row * (height + pad), pad + column * (width + pad)
                out[top : top + height, left : left + width] = images[row]
        return (out * 255).round().astype(np.uint8)


def reconstruct(
    model,
    pixel_values: torch.Tensor,
    mask_inputs: dict[str, torch.Tensor],
    image_mean: Sequence[float],
    image_std: Sequence[float],
) -> Reconstructions:
    """Run `model` on normalised `pixel_values` with the given masking argument and un-normalise everything to
    [0, 1] for display (MAE's `norm_pix_loss` normalisation is undone with the original patches' statistics)."""
    method = check_model(model)
    if not method.reconstructs_pixels:
        raise ValueError(f"{method.name} predicts no pixels: there is no reconstruction to draw")
    model_pass = run_model(model, pixel_values, mask_inputs)
    pixels = pixel_values.float().cpu()
    hidden = patch_mask_to_pixels(model_pass.mask.cpu(), pixels.shape[-1], square_side(model.config.patch_size))
    original = to_display(pixels, image_mean, image_std)
    prediction = to_display(model_pass.prediction.cpu(), image_mean, image_std)
    hidden_hw = hidden.permute(0, 2, 3, 1).numpy()  # [B, H, W, 1]
    masked = original * (1 - hidden_hw) + MASKED_GREY * hidden_hw
    composite = original * (1 - hidden_hw) + prediction * hidden_hw
    return Reconstructions(original=original, masked=masked, reconstruction=prediction, composite=composite)


def plot_reconstructions(reconstructions: Reconstructions, path: str | os.PathLike, title: str | None = None) -> Path:
    """Rows: images; columns: original / masked / reconstruction / reconstruction + visible; as a PNG."""
    batch = reconstructions.original.shape[0]
    fig = Figure(figsize=(1.8 * 4, 1.8 * batch + 0.4 + (0.3 if title else 0)))
    axes = fig.subplots(batch, 4, squeeze=False)
    for column, images in enumerate(reconstructions.panels()):
        for row in range(batch):
            ax = axes[row, column]
            ax.imshow(images[row], interpolation="nearest")
            ax.axis("off")
            if row == 0:
                ax.set_title(Reconstructions.COLUMNS[column], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return Path(path)


# --------------------------------------------------------------------------------------------------------------------
# Trainer callback
# --------------------------------------------------------------------------------------------------------------------


def _tensorboard_available() -> bool:
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class ReconstructionCallback(TrainerCallback):
    """At every evaluation, on the main process, reconstruct a fixed batch of evaluation images with a fixed mask and
    write ``<output_dir>/reconstructions/step-<global step>.png`` (and a TensorBoard image, ``reconstructions``, when
    TensorBoard is installed and reported to).

    Args:
        eval_dataset: evaluation images, items holding ``"pixel_values"`` already transformed (normalised), or a
            ``[M, C, H, W]`` tensor; the first `num_images` are drawn.
        image_mean, image_std: the normalisation of the pixels (the image processor's), to undo for display.
        num_images: rows of the picture.
        seed: seed of the fixed mask.
        masking, mask_patch_size: the mask's strategy (see `draw_mask_inputs`); default the trainer's (its
            `--masking`, except `evolved`, whose masks change with the weights, and `--mask_patch_size`), else the
            model's own.
        dirname: folder under `output_dir`.

    TensorBoard: `attach(trainer)` adds the callback and lets it write into the trainer's own TensorBoard run (the
    `TensorBoardCallback`'s writer). Added through `callbacks=[...]` instead, it opens a writer of its own, when
    ``"tensorboard"`` is in `report_to`, in ``$TENSORBOARD_LOGGING_DIR`` if set (the folder the TensorBoardCallback
    then uses too), else in ``<output_dir>/runs/reconstructions`` (a run of its own in TensorBoard).

    The model runs on the main process alone: under FSDP (version 2) on a plain copy with the gathered weights
    (`hf_mto.evaluation.unsharded_model`); under DeepSpeed ZeRO-3 (sharded weights) leave it out.
    """

    def __init__(
        self,
        eval_dataset,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        num_images: int = 8,
        seed: int = 0,
        masking: str | None = None,
        mask_patch_size: int | None = None,
        dirname: str = "reconstructions",
    ):
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        if eval_dataset is None or len(eval_dataset) == 0:
            raise ValueError("ReconstructionCallback needs a non-empty eval_dataset")
        if len(image_mean) != len(image_std):
            raise ValueError(f"image_mean {list(image_mean)} and image_std {list(image_std)} differ in length")
        num_images = min(num_images, len(eval_dataset))
        if isinstance(eval_dataset, torch.Tensor):
            self.pixel_values = eval_dataset[:num_images].float()
        else:
            self.pixel_values = first_readable_pixels(eval_dataset, num_images).float()
        self.image_mean, self.image_std = list(image_mean), list(image_std)
        self.seed, self.masking, self.mask_patch_size, self.dirname = seed, masking, mask_patch_size, dirname
        self._mask_inputs = None
        self._trainer = None
        self._own_writer = None

    def attach(self, trainer) -> ReconstructionCallback:
        """Add this callback to `trainer` (once) and write TensorBoard images into its TensorBoard run."""
        self._trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    def mask_inputs(self, model, args=None) -> dict[str, torch.Tensor]:
        """The fixed masking argument, drawn once (on the CPU, from `seed`)."""
        if self._mask_inputs is None:
            masking = self.masking or getattr(args, "masking", None)
            if masking == "evolved":
                masking = None
            mask_patch_size = self.mask_patch_size or getattr(args, "mask_patch_size", None)
            generator = torch.Generator().manual_seed(self.seed)
            self._mask_inputs = draw_mask_inputs(
                model, len(self.pixel_values), generator, masking=masking, mask_patch_size=mask_patch_size
            )
        return self._mask_inputs

    def _tensorboard_writer(self, args):
        if self._trainer is not None:
            from transformers.integrations import TensorBoardCallback

            for callback in self._trainer.callback_handler.callbacks:
                if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
                    return callback.tb_writer
        report_to = args.report_to if isinstance(args.report_to, (list, tuple)) else [args.report_to]
        if ("tensorboard" in report_to or "all" in report_to) and _tensorboard_available():
            if self._own_writer is None:
                from torch.utils.tensorboard import SummaryWriter

                # The TensorBoardCallback's own folder when the user fixed it, else a run of its own.
                log_dir = os.environ.get("TENSORBOARD_LOGGING_DIR") or os.path.join(
                    args.output_dir, "runs", self.dirname
                )
                self._own_writer = SummaryWriter(log_dir=os.path.expanduser(log_dir))
            return self._own_writer
        return None

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        model = getattr(model, "module", model)  # DDP / DataParallel wrappers
        try:
            check_model(model)
        except ValueError:
            return  # another model type: nothing to draw
        # Under FSDP every process takes part in gathering the weights, onto the main process (a collective).
        model = unsharded_model(model, main_process_only=True)
        if not state.is_world_process_zero:
            return
        was_training = model.training
        model.eval()
        try:
            pictures = reconstruct(
                model, self.pixel_values, self.mask_inputs(model, args), self.image_mean, self.image_std
            )
        finally:
            model.train(was_training)
        folder = Path(args.output_dir) / self.dirname
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step-{state.global_step}.png"
        plot_reconstructions(pictures, path, title=f"step {state.global_step}")
        writer = self._tensorboard_writer(args)
        if writer is not None:
            writer.add_image(self.dirname, pictures.grid(), state.global_step, dataformats="HWC")
            writer.flush()

    def on_train_end(self, args, state, control, **kwargs):
        if self._own_writer is not None:
            self._own_writer.close()
            self._own_writer = None
