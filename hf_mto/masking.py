"""Mask generators for masked image modeling: random, SimMIM block, BEiT block and evolved hierarchical (EHM).

Tensors in, tensors out: nothing here imports transformers, so models, trainer and collators can all use it.

Conventions shared by every function:

- A mask is ``[B, N]`` bool, ``True`` = masked, patches in row-major order (the order HF ViT patch embeddings use).
- Every generator masks **exactly** ``round(mask_ratio * N)`` patches per row (Python's ``round``, which rounds
  halves to even: ``round(2.5) == 2``). A fixed count keeps rows stackable for MAE, which drops the same number of
  tokens in every row, and makes the effective ratio independent of the generator.
- Randomness comes only from the optional ``generator`` (it must live on the device the work runs on); without one
  the global torch RNG is used, so ``torch.manual_seed`` also makes results reproducible.

Evolved hierarchical masking (EHM, see ``DESIGN.md`` and the EHM paper, Sections III-IV) is split into pure steps:
``attention_similarity`` -> ``build_merge_tree`` -> ``evolved_depth`` -> ``cut_tree`` / ``evolved_mask``.
The model-side pass that produces the attention maps lives with the models.
"""

import math
from dataclasses import dataclass

import torch

# BEiT's MaskingGenerator tries at most this many rectangles before it gives up on adding more patches.
_BEIT_ATTEMPTS = 10

# Absorbs float64 rounding in the depth schedule: 100 * 0.29 evaluates to 28.999999999999996, whose floor would be
# one level short of what the user wrote. Genuine fractions this close below an integer cannot be told apart from
# that rounding noise anyway.
_DEPTH_EPS = 1e-9


# --------------------------------------------------------------------------------------------------------------------
# Validation and shared helpers
# --------------------------------------------------------------------------------------------------------------------


def square_side(size: int | tuple[int, int] | list[int]) -> int:
    """The side of a square image or patch size given as an int or as ``(height, width)`` (configs allow both)."""
    return size if isinstance(size, int) else size[0]


def _check_positive_int(name: str, value: int) -> None:
    # bool is an int subclass; rejecting it catches swapped positional arguments such as a flag passed as a size.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _num_masked(num_patches: int, mask_ratio: float) -> int:
    # `not 0 < r < 1` is also True for NaN, so NaN is rejected here too.
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio!r}")
    return round(mask_ratio * num_patches)


def _mask_lowest(keys: torch.Tensor, num_masked: int) -> torch.Tensor:
    """Mask the `num_masked` positions with the lowest keys in each row. keys: [B, N] -> mask: [B, N] bool."""
    # Every generator ends here, so "exactly num_masked per row" holds by construction for all of them.
    ids = keys.argsort(dim=1)[:, :num_masked]
    mask = torch.zeros(keys.shape, dtype=torch.bool, device=keys.device)
    return mask.scatter_(1, ids, True)


# --------------------------------------------------------------------------------------------------------------------
# Standard generators
# --------------------------------------------------------------------------------------------------------------------


def random_mask(
    batch_size: int,
    num_patches: int,
    mask_ratio: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniformly random mask with exactly ``round(mask_ratio * num_patches)`` masked patches per row (MAE's masking).

    Args:
        batch_size: B, number of rows.
        num_patches: N, patches per image.
        mask_ratio: fraction of patches to mask, in (0, 1).
        generator: optional RNG on ``device`` for reproducible masks.
        device: where the mask is created.

    Returns:
        mask: ``[B, N]`` bool, True = masked.
    """
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("num_patches", num_patches)
    num_masked = _num_masked(num_patches, mask_ratio)
    # Argsort of i.i.d. uniform noise is a uniformly random permutation, so its first K entries are a uniformly
    # random K-subset - the same construction MAE uses.
    noise = torch.rand(batch_size, num_patches, generator=generator, device=device)
    return _mask_lowest(noise, num_masked)


def simmim_block_mask(
    batch_size: int,
    image_size: int,
    model_patch_size: int,
    mask_patch_size: int = 32,
    mask_ratio: float = 0.6,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """SimMIM's block mask: random ``mask_patch_size`` squares, each covering ``scale x scale`` model patches.

    The image is split into ``G x G`` mask patches (``G = image_size // mask_patch_size``). Exactly
    ``round(mask_ratio * G**2)`` of them (the *block count*) are masked uniformly at random, then each is upsampled
    to ``scale**2`` model patches, ``scale = mask_patch_size // model_patch_size``. Every row therefore has exactly
    ``round(mask_ratio * G**2) * scale**2`` masked model patches, which can differ slightly from
    ``round(mask_ratio * N)``. The official SimMIM MaskGenerator uses ``ceil`` for the block count; we use ``round``
    like every other generator here (the two agree for SimMIM's 192 px / 32 px default of 36 blocks at 0.6).

    Args:
        batch_size: B.
        image_size: side of the square image in pixels.
        model_patch_size: the ViT's patch size in pixels.
        mask_patch_size: side of a masked square in pixels; must divide ``image_size`` and be a multiple of
            ``model_patch_size``.
        mask_ratio: fraction of mask patches to mask, in (0, 1).
        generator: optional RNG on ``device``.
        device: where the mask is created.

    Returns:
        mask: ``[B, N]`` bool, True = masked, ``N = (image_size // model_patch_size)**2`` in row-major order.
    """
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("image_size", image_size)
    _check_positive_int("model_patch_size", model_patch_size)
    _check_positive_int("mask_patch_size", mask_patch_size)
    if image_size % mask_patch_size != 0:
        raise ValueError(f"image_size ({image_size}) must be divisible by mask_patch_size ({mask_patch_size})")
    if mask_patch_size % model_patch_size != 0:
        raise ValueError(
            f"mask_patch_size ({mask_patch_size}) must be a multiple of model_patch_size ({model_patch_size})"
        )
    grid = image_size // mask_patch_size
    scale = mask_patch_size // model_patch_size
    coarse = random_mask(batch_size, grid * grid, mask_ratio, generator=generator, device=device)
    # Upsample each mask patch to its scale x scale model patches, keeping row-major order of the model grid.
    fine = coarse.view(batch_size, grid, 1, grid, 1).expand(batch_size, grid, scale, grid, scale)
    return fine.reshape(batch_size, grid * scale * grid * scale)


def _beit_rectangles(
    height: int,
    width: int,
    num_masked: int,
    min_num_patches: int,
    max_num_patches: int,
    log_aspect: tuple[float, float],
    generator: torch.Generator | None,
    device: torch.device | str | None,
) -> list[bool]:
    """BEiT's rectangle placement for one image; returns a flat row-major mask with at most `num_masked` True, each
    rectangle adding at most `max_num_patches`."""
    mask = [False] * (height * width)
    count = 0
    while count < num_masked:
        remaining = min(num_masked - count, max_num_patches)
        added = 0
        # One draw per round of attempts: four uniforms (area, aspect, top, left) for each attempt.
        for u_area, u_aspect, u_top, u_left in torch.rand(
            _BEIT_ATTEMPTS, 4, generator=generator, device=device
        ).tolist():
            # random.uniform(min_num_patches, remaining) as in BEiT; when remaining < min_num_patches the range is
            # reversed, as it is in BEiT, and the area lands in [remaining, min_num_patches].
            area = min_num_patches + u_area * (remaining - min_num_patches)
            aspect = math.exp(log_aspect[0] + u_aspect * (log_aspect[1] - log_aspect[0]))
            h = round(math.sqrt(area * aspect))
            w = round(math.sqrt(area / aspect))
            # BEiT requires the rectangle to be strictly smaller than the grid.
            if h < height and w < width:
                top = int(u_top * (height - h + 1))
                left = int(u_left * (width - w + 1))
                new = [
                    r * width + c
                    for r in range(top, top + h)
                    for c in range(left, left + w)
                    if not mask[r * width + c]
                ]
                # BEiT only accepts rectangles that add something without overshooting the target.
                if 0 < len(new) <= remaining:
                    for idx in new:
                        mask[idx] = True
                    added = len(new)
                    break
        if added == 0:
            break
        count += added
    return mask


def beit_block_mask(
    batch_size: int,
    grid_size: int | tuple[int, int],
    mask_ratio: float,
    *,
    min_num_patches: int = 16,
    max_num_patches: int | None = None,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
    block_ratio: float | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """BEiT's block-wise mask: random rectangles until ``round(mask_ratio * N)`` patches are masked (or
    ``round(block_ratio * N)``, the rest then drawn uniformly at random).

    Rectangles are placed as in BEiT's ``MaskingGenerator``: area uniform in ``[min_num_patches, remaining]``,
    aspect ratio log-uniform in ``[min_aspect, max_aspect]``, accepted only if they add at least one and at most
    ``remaining`` new patches; after 10 failed attempts BEiT stops and can fall short of the target. We then **top up**
    with uniformly random unmasked patches, so every row has exactly ``round(mask_ratio * N)`` masked patches (the
    acceptance rule never overshoots, so nothing has to be trimmed). With high ratios or ``min_num_patches`` larger
    than the grid allows, much of the mask can come from the top-up.

    Rectangles are placed by a Python loop per image on the host (BEiT's own algorithm is sequential); it is cheap
    next to a training step, and only the uniform draws touch ``device``.

    Args:
        batch_size: B.
        grid_size: patch grid as ``side`` or ``(height, width)``; N = height * width.
        mask_ratio: fraction of patches to mask, in (0, 1).
        min_num_patches: smallest target rectangle area (BEiT pre-training uses 16).
        max_num_patches: most patches one rectangle may add; ``None``: no limit but the target (BEiT's default).
        block_ratio: the share of the patches masked by rectangles, at most ``mask_ratio``; the rest of the
            ``round(mask_ratio * N)`` are uniformly random. ``None``: all of them (BEiT).
        min_aspect: smallest height / width ratio, > 0.
        max_aspect: largest height / width ratio; ``None`` means ``1 / min_aspect``.
        generator: optional RNG on ``device``.
        device: where the mask is created.

    Returns:
        mask: ``[B, N]`` bool, True = masked, row-major over the grid.
    """
    _check_positive_int("batch_size", batch_size)
    if isinstance(grid_size, int):
        grid_size = (grid_size, grid_size)
    if not isinstance(grid_size, tuple | list) or len(grid_size) != 2:
        raise ValueError(f"grid_size must be an int or a (height, width) pair, got {grid_size!r}")
    height, width = grid_size
    _check_positive_int("grid height", height)
    _check_positive_int("grid width", width)
    _check_positive_int("min_num_patches", min_num_patches)
    if not min_aspect > 0:
        raise ValueError(f"min_aspect must be > 0, got {min_aspect!r}")
    if max_aspect is None:
        max_aspect = 1.0 / min_aspect
    if not max_aspect >= min_aspect:
        raise ValueError(f"max_aspect must be >= min_aspect ({min_aspect}), got {max_aspect!r}")
    num_patches = height * width
    num_masked = _num_masked(num_patches, mask_ratio)
    num_block = num_masked if block_ratio is None else round(block_ratio * num_patches)
    if not 0 <= num_block <= num_masked:
        raise ValueError(
            f"block_ratio must give at most {num_masked} patches (mask_ratio {mask_ratio}), got {block_ratio}"
        )
    if max_num_patches is None:
        max_num_patches = max(num_block, 1)
    _check_positive_int("max_num_patches", max_num_patches)
    log_aspect = (math.log(min_aspect), math.log(max_aspect))
    rectangles = torch.tensor(
        [
            _beit_rectangles(height, width, num_block, min_num_patches, max_num_patches, log_aspect, generator, device)
            for _ in range(batch_size)
        ],
        dtype=torch.bool,
        device=device,
    )
    # Rectangle patches get keys in [-1, 0), the rest [0, 1): the lowest num_masked keys are all rectangle patches
    # (at most num_masked of them) plus a uniformly random choice of the others for the top-up.
    noise = torch.rand(batch_size, num_patches, generator=generator, device=device)
    return _mask_lowest(noise - rectangles.float(), num_masked)


# --------------------------------------------------------------------------------------------------------------------
# Handing masks to models
# --------------------------------------------------------------------------------------------------------------------


MASKING_STRATEGIES = ("random", "simmim_block", "beit_block", "bootmae_block")

# BootMAE's block masking (its official masking generator, ViT-B/16): rectangles cover 120 of the 196 patches, at
# most 60 each, and random patches make up the rest of the mask ratio (27 more at 75 %, 147 in all).
BOOTMAE_BLOCK_RATIO = 120 / 196
BOOTMAE_MAX_BLOCK_RATIO = 60 / 196


@dataclass(frozen=True)
class MaskGenerator:
    """One standard masking strategy for a model's patch grid: ``generator(batch_size, device) -> bool [B, N]``.

    Args:
        strategy: ``"random"`` (MAE), ``"simmim_block"`` (SimMIM: ``mask_patch_size`` squares), ``"beit_block"``
            (BEiT: rectangles of at least 16 patches) or ``"bootmae_block"`` (BootMAE: rectangles over 120/196 of
            the patches, at most 60/196 each, topped up with random patches).
        image_size: image side in pixels.
        patch_size: the model's patch side in pixels.
        mask_ratio: fraction of patches to mask.
        mask_patch_size: side of SimMIM's mask squares in pixels (a multiple of ``patch_size``).
    """

    strategy: str
    image_size: int
    patch_size: int
    mask_ratio: float
    mask_patch_size: int = 32

    def __post_init__(self):
        if self.strategy not in MASKING_STRATEGIES:
            raise ValueError(f"masking must be one of {MASKING_STRATEGIES}, got {self.strategy!r}")
        _check_positive_int("patch_size", self.patch_size)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be divisible by patch_size {self.patch_size}")
        _num_masked(self.num_patches, self.mask_ratio)  # validates the ratio
        if self.strategy == "simmim_block" and (
            self.image_size % self.mask_patch_size or self.mask_patch_size % self.patch_size
        ):
            raise ValueError(
                f"mask_patch_size {self.mask_patch_size} must divide image_size {self.image_size} and be a multiple "
                f"of patch_size {self.patch_size}"
            )

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_masked(self) -> int:
        """The exact number of masked patches in every row."""
        if self.strategy == "simmim_block":
            scale = self.mask_patch_size // self.patch_size
            return _num_masked((self.image_size // self.mask_patch_size) ** 2, self.mask_ratio) * scale**2
        return _num_masked(self.num_patches, self.mask_ratio)

    def __call__(
        self, batch_size: int, device: torch.device | str | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        if self.strategy == "random":
            return random_mask(batch_size, self.num_patches, self.mask_ratio, generator=generator, device=device)
        if self.strategy == "simmim_block":
            return simmim_block_mask(
                batch_size,
                self.image_size,
                self.patch_size,
                self.mask_patch_size,
                self.mask_ratio,
                generator=generator,
                device=device,
            )
        if self.strategy == "bootmae_block":
            return beit_block_mask(
                batch_size,
                self.grid_size,
                self.mask_ratio,
                max_num_patches=max(1, round(BOOTMAE_MAX_BLOCK_RATIO * self.num_patches)),
                block_ratio=min(BOOTMAE_BLOCK_RATIO, self.num_masked / self.num_patches),
                generator=generator,
                device=device,
            )
        return beit_block_mask(batch_size, self.grid_size, self.mask_ratio, generator=generator, device=device)


def mask_to_noise(mask: torch.Tensor, *, expected_num_masked: int | None = None) -> torch.Tensor:
    """Turn a mask into the ``noise`` argument of HF ``ViTMAEForPreTraining`` so that MAE masks exactly ``mask``.

    HF MAE argsorts ``noise`` ascending and keeps the first ``int(N * (1 - config.mask_ratio))`` patches. Visible
    patches get noise in ``[0, 1)`` and masked ones in ``[1, 2)``, so the kept patches are exactly the visible ones
    provided every row masks ``N - int(N * (1 - config.mask_ratio))`` patches - pass that as
    ``expected_num_masked``. (That count can differ from ``round(mask_ratio * N)`` by float rounding, e.g.
    N=10, ratio 0.9 gives 10, so models should compute it the way MAE does.)

    The noise is ``mask + position / N``: no randomness is needed, and the kept tokens stay in their original order.

    Args:
        mask: ``[B, N]`` bool, True = masked; every row must mask the same number of patches.
        expected_num_masked: if given, the number of masked patches every row must have.

    Returns:
        noise: ``[B, N]`` float32 on ``mask``'s device.
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        described = (
            f"{mask.dtype} tensor of shape {list(mask.shape)}"
            if isinstance(mask, torch.Tensor)
            else type(mask).__name__
        )
        raise ValueError(f"mask must be a [B, N] torch.bool tensor, got {described}")
    counts = mask.sum(dim=1)
    # MAE drops the same number of tokens in every row; a ragged mask would silently be changed by its argsort.
    if counts.numel() > 0 and (counts != counts[0]).any():
        raise ValueError(f"every row of mask must mask the same number of patches, got counts {counts.tolist()}")
    if expected_num_masked is not None and counts.numel() > 0 and int(counts[0]) != expected_num_masked:
        raise ValueError(
            f"mask has {int(counts[0])} masked patches per row, but the model masks {expected_num_masked} "
            f"(N - int(N * (1 - mask_ratio)))"
        )
    num_patches = mask.shape[1]
    position = torch.arange(num_patches, device=mask.device, dtype=torch.float32) / num_patches
    return mask.float() + position


# --------------------------------------------------------------------------------------------------------------------
# Evolved hierarchical masking
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergeTree:
    """Binary merge trees of a batch of images, from average-linkage clustering of their N patches.

    Node ids: leaves (patches) are ``0 .. N-1``; the k-th merge creates node ``N + k``, so the root is ``2N - 2``.

    Attributes:
        merges: ``[B, N-1, 2]`` long, the two children of node ``N + k`` (smaller id first).
        levels: ``[B, 2N-1]`` long, leaves 0, a merged node ``max(children's levels) + 1`` (EHM Eq. 10).
        sizes: ``[B, 2N-1]`` long, number of leaves under each node.
        heights: ``[B]`` long, level of the root.
    """

    merges: torch.Tensor
    levels: torch.Tensor
    sizes: torch.Tensor
    heights: torch.Tensor

    @property
    def num_leaves(self) -> int:
        """N, the number of patches per image."""
        return self.merges.shape[1] + 1


def build_merge_tree(similarity: torch.Tensor) -> MergeTree:
    """Average-linkage agglomerative clustering of patches, batched over images (EHM Eqs. 7-13).

    Each of the N-1 steps merges the most similar pair of active clusters ``a, b``; the merged cluster's similarity
    to any other cluster k is the leaf-count-weighted average ``(n_a S[a,k] + n_b S[b,k]) / (n_a + n_b)`` (Eq. 7),
    which equals the mean leaf-to-leaf similarity (UPGMA).

    Implementation: an ``[B, N, N]`` working matrix with one slot per active cluster. The merged cluster reuses the
    lower of its children's slots and the other slot is retired, so the matrix never grows past N x N (a slot per
    node, 2N-1, would make every argmax ~4x more expensive). Retired rows/columns and the diagonal hold -inf so
    argmax never picks them. Ties are broken by the lowest flat index ``row * N + col`` of the slots (torch.argmax
    returns the first maximum), which makes the tree deterministic. Images run in parallel on ``similarity``'s
    device; only the N-1 merge steps are a Python loop, each one argmax over ``B * N**2`` entries plus O(B N)
    updates in about 22 operators (one gather and one indexed write for the per-slot state, one gather for both rows,
    four indexed writes for the rows and columns; on a GPU the loop is bound by their launches:
    `benchmarks/merge_tree.py` counts them, `benchmarks/evolved_overhead.py` measures the tree's share of a step).

    Only the symmetric part ``(S + S^T) / 2`` is used (the diagonal is ignored), so similarities computed with
    slightly asymmetric rounding are fine. Half-precision input is promoted to float32 to avoid spurious ties.

    Args:
        similarity: ``[B, N, N]`` float, finite, larger = more similar.

    Returns:
        MergeTree on ``similarity``'s device.
    """
    if not isinstance(similarity, torch.Tensor) or similarity.dim() != 3 or similarity.shape[1] != similarity.shape[2]:
        shape = list(similarity.shape) if isinstance(similarity, torch.Tensor) else type(similarity).__name__
        raise ValueError(f"similarity must be a square [B, N, N] tensor, got {shape}")
    batch, n = similarity.shape[0], similarity.shape[1]
    if batch < 1 or n < 1:
        raise ValueError(f"similarity needs at least one image and one patch, got shape {list(similarity.shape)}")
    if not similarity.is_floating_point():
        raise ValueError(f"similarity must be a floating-point tensor, got {similarity.dtype}")
    # NaN would make argmax meaningless and +-inf would turn the weighted averages into NaN.
    if not torch.isfinite(similarity).all():
        raise ValueError("similarity must be finite, got NaN or inf entries")

    device = similarity.device
    dtype = torch.promote_types(similarity.dtype, torch.float32)
    work = ((similarity + similarity.transpose(1, 2)) / 2).to(dtype).contiguous()
    work.diagonal(dim1=1, dim2=2).fill_(-math.inf)

    # Per slot, packed so that one gather reads both merged clusters and one indexed write stores the result: the
    # node it holds, its level and its leaf count.
    images, slots = torch.arange(batch, device=device), torch.arange(n, device=device)
    slot_state = torch.stack([slots, torch.zeros_like(slots), torch.ones_like(slots)], dim=1).repeat(batch, 1, 1)
    node_ids = torch.arange(n, 2 * n - 1, device=device).unsqueeze(1).expand(-1, batch)  # [N-1, B]
    children, made = [], []  # per step: [B, 2] nodes merged, [B, 3] (node, level, size) made

    for k in range(n - 1):
        # The matrix is symmetric, so the lowest flat index of a maximum has row < column: the merged cluster goes
        # to slot `keep` < `drop`. No host synchronisation happens in this loop, so on a GPU it runs asynchronously.
        flat = work.view(batch, n * n).argmax(dim=1)
        pair = torch.stack([flat // n, flat % n], dim=1)  # [B, 2]: keep, drop
        held = slot_state.gather(1, pair.unsqueeze(2).expand(-1, -1, 3))  # [B, 2, 3]
        size = held[:, :, 2].to(dtype)

        # Eq. 7. Retired slots stay -inf (-inf times a positive weight); the entries at `keep` and `drop` come out
        # -inf too because each child row has -inf on its own diagonal.
        weight_a = (size[:, 0] / size.sum(dim=1)).unsqueeze(1)
        rows = work.gather(1, pair.unsqueeze(2).expand(-1, -1, n))  # [B, 2, N]
        merged = weight_a * rows[:, 0] + (1 - weight_a) * rows[:, 1]
        keep, drop = pair.unbind(1)
        work[images, keep] = merged
        work[images, :, keep] = merged
        work[images, drop] = -math.inf
        work[images, :, drop] = -math.inf

        new = torch.stack([node_ids[k], held[:, :, 1].amax(dim=1) + 1, held[:, :, 2].sum(dim=1)], dim=1)  # [B, 3]
        slot_state[images, keep] = new
        children.append(held[:, :, 0])
        made.append(new)

    leaves = slot_state.new_zeros(batch, n)
    if n == 1:
        merges = slot_state.new_zeros(batch, 0, 2)
        levels, sizes = leaves, leaves + 1
    else:
        merges = torch.stack(children, dim=1).sort(dim=2).values  # [B, N-1, 2], smaller id first
        made = torch.stack(made, dim=1)  # [B, N-1, 3]
        levels = torch.cat([leaves, made[:, :, 1]], dim=1)
        sizes = torch.cat([leaves + 1, made[:, :, 2]], dim=1)
    return MergeTree(merges=merges, levels=levels, sizes=sizes, heights=levels[:, -1].clone())


def _check_depth(depth: torch.Tensor, batch: int) -> None:
    if (
        not isinstance(depth, torch.Tensor)
        or depth.shape != (batch,)
        or depth.is_floating_point()
        or depth.is_complex()
    ):
        described = f"{depth.dtype} tensor of shape {list(depth.shape)}" if isinstance(depth, torch.Tensor) else depth
        raise ValueError(f"depth must be an integer tensor of shape [{batch}], got {described}")
    if (depth < 0).any():
        raise ValueError(f"depth must be >= 0, got {depth.tolist()}")


def cut_tree(tree: MergeTree, depth: torch.Tensor) -> torch.Tensor:
    """Cut each tree at a depth: label every patch with the root of its maximal subtree of level <= depth.

    Those maximal subtrees partition the patches (every leaf is in exactly one). ``depth = 0`` makes every patch
    its own group; ``depth >= height`` puts all patches in one group (the root).

    Args:
        tree: merge trees of B images with N patches.
        depth: ``[B]`` integer, >= 0, one depth per image.

    Returns:
        labels: ``[B, N]`` long, the node id (in ``0 .. 2N-2``) of each patch's group root.
    """
    batch, n = tree.levels.shape[0], tree.num_leaves
    _check_depth(depth, batch)
    device = tree.levels.device
    depth = torch.minimum(depth.to(device=device, dtype=torch.long), tree.heights)

    # parents[node]; the root points to itself so climbing past it is a no-op.
    parents = torch.arange(2 * n - 1, device=device).repeat(batch, 1)
    parent_ids = torch.arange(n, 2 * n - 1, device=device).repeat_interleave(2).expand(batch, -1)
    parents.scatter_(1, tree.merges.reshape(batch, -1), parent_ids)

    # Levels strictly increase towards the root, so climbing while the parent's level is <= depth ends at the maximal
    # subtree. Each climb raises the level by >= 1, so `depth` climbs are enough.
    labels = torch.arange(n, device=device).repeat(batch, 1)
    for _ in range(int(depth.max())):
        up = parents.gather(1, labels)
        labels = torch.where(tree.levels.gather(1, up) <= depth.unsqueeze(1), up, labels)
    return labels


def evolved_mask(
    tree: MergeTree,
    depth: torch.Tensor,
    mask_ratio: float,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """EHM mask (Eqs. 15-16): mask whole subtrees at ``depth``, visited in random order, until the count is exact.

    The maximal subtrees of level <= depth (see ``cut_tree``) are visited in random order and all their patches
    masked until ``round(mask_ratio * N)`` are masked; the last subtree is truncated to a uniformly random subset of
    its patches so the count is exact. Vectorised as one sort: every group gets a random rank, every patch a random
    rank within the image, and patches are sorted by ``(group rank, patch rank)``; the first K are masked. At depth 0
    every group is one patch, so this is exactly uniform random masking.

    Args:
        tree: merge trees of B images with N patches.
        depth: ``[B]`` integer, >= 0 (values above the height mean the whole image is one group).
        mask_ratio: fraction of patches to mask, in (0, 1).
        generator: optional RNG on the tree's device.

    Returns:
        mask: ``[B, N]`` bool, True = masked, on the tree's device.
    """
    n = tree.num_leaves
    num_masked = _num_masked(n, mask_ratio)
    labels = cut_tree(tree, depth)
    batch, device = labels.shape[0], labels.device
    # Argsort of i.i.d. noise is a uniformly random permutation; read as values it assigns each node (resp. patch) a
    # distinct random rank. Only the ranks of group roots are used.
    group_rank = torch.rand(batch, 2 * n - 1, generator=generator, device=device).argsort(dim=1)
    patch_rank = torch.rand(batch, n, generator=generator, device=device).argsort(dim=1)
    return _mask_lowest(group_rank.gather(1, labels) * n + patch_rank, num_masked)


def evolved_depth(heights: torch.Tensor, progress: float, f0: float = 0.0, f1: float = 1.0) -> torch.Tensor:
    """Masking depth at training progress t (EHM Eq. 14, generalised): ``d = floor(h * (f0 + (f1 - f0) * t))``.

    ``t`` is the training progress, the fraction of training done, in [0, 1] (the trainer's fractional epoch over the
    total, counted in optimizer steps, so a one-epoch run sweeps the whole schedule). The paper's schedule is
    ``f0 = 0, f1 = 1``: the depth grows linearly from 0 (random masking) to h. Note that at depth h the only group is
    the root, so that mask is a random subset again; the coarsest structured masks come just before (the root's two
    children at h - 1). A pure function of t, so resuming at the same point of training gives the same depths.

    Args:
        heights: ``[B]`` integer, tree heights (``MergeTree.heights``).
        progress: training progress t in [0, 1].
        f0: fraction of the height at t = 0.
        f1: fraction of the height at t = 1; ``0 <= f0 <= f1 <= 1``.

    Returns:
        depth: ``[B]`` long in ``[0, h]``, on ``heights``' device.
    """
    if not isinstance(heights, torch.Tensor) or heights.dim() != 1 or heights.is_floating_point():
        described = (
            f"{heights.dtype} tensor of shape {list(heights.shape)}" if isinstance(heights, torch.Tensor) else heights
        )
        raise ValueError(f"heights must be a [B] integer tensor, got {described}")
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1] (the fraction of training done), got {progress!r}")
    if not 0.0 <= f0 <= f1 <= 1.0:
        raise ValueError(f"need 0 <= f0 <= f1 <= 1, got f0={f0!r}, f1={f1!r}")
    h = heights.to(torch.float64)
    # With f0, f1 and t in [0, 1] the depth is in [0, h]: no clamping needed.
    return torch.floor(h * f0 + h * (f1 - f0) * progress + _DEPTH_EPS).long()


def attention_similarity(attentions: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Patch similarity for EHM from ViT attention maps: mean over layers and heads, CLS dropped, symmetrised.

    ``S = (A + A^T) / 2`` where A is the post-softmax attention averaged over the given layers and all heads, with
    the CLS row and column (token 0) removed. Computed layer by layer in float32 (or float64 for float64 input), so
    no ``[L, ...]`` stack is materialised.

    Args:
        attentions: ``[L, B, heads, N+1, N+1]`` tensor, or a list/tuple of L ``[B, heads, N+1, N+1]`` tensors
            (what HF models return as ``output_attentions``).

    Returns:
        similarity: ``[B, N, N]`` float, symmetric.
    """
    if isinstance(attentions, torch.Tensor):
        if attentions.dim() != 5:
            raise ValueError(f"attentions must be [L, B, heads, N+1, N+1], got shape {list(attentions.shape)}")
        layers = list(attentions.unbind(0))
    else:
        layers = list(attentions)
    if not layers:
        raise ValueError("attentions must contain at least one layer, got none")
    shape = layers[0].shape
    for index, layer in enumerate(layers):
        if layer.dim() != 4 or layer.shape != shape or shape[-1] != shape[-2] or shape[-1] < 2:
            raise ValueError(
                f"every layer's attention must be [B, heads, N+1, N+1] with N >= 1 and the same shape as layer 0 "
                f"({list(shape)}), got {list(layer.shape)} at layer {index}"
            )
    dtype = torch.promote_types(layers[0].dtype, torch.float32)
    total = sum(layer[:, :, 1:, 1:].to(dtype).mean(dim=1) for layer in layers)
    mean = total / len(layers)
    return (mean + mean.transpose(1, 2)) / 2
