# Generated from hf_mto/mto.py by `python scripts/copy_mto.py`: edit that file, then run the script. This copy is
# what `save_pretrained` bundles beside a checkpoint as remote code (see the script's docstring).
"""Masked Token Optimization (MTO): the math, as pure tensor functions, and the MTO fields of a model config.

Implements the terms of "Emerging Property of Masked Token for Effective Pre-training" (arXiv 2404.08330),
as decided in DESIGN.md:

- ``heterogeneity``     Eq. 2   H: entropy of a masked token's affinity over the visible tokens.
- ``sparsity_loss``     Eq. 3   L_spa: entropy of a visible token's affinity over all tokens.
- ``singularity_loss``  Eq. 6   L_e = 1 / (H^0 + eps).
- ``ranking_loss``      Eq. 7   L_r: softplus ranking that makes H decrease with depth.

Conventions: ``hidden`` is ``[B, N, D]`` (patch tokens only, never the CLS token); ``mask`` is ``[B, N]`` bool,
True = masked. Affinity logits default to the cosine similarity / 0.1 (``"cosine"``): the paper's raw dot product
saturates the softmax at ViT-B widths (DESIGN.md, "MTO math"), and ``x_i . x_j / sqrt(D)`` (``"scaled"``) lets L_spa
be met by one large-norm "sink" token that every row points at (docs/RESULTS.md, docs/DECISIONS.md). Everything is
computed in float32 with autocast disabled, through ``log_softmax`` (never ``log(softmax)``), and is finite (values and
gradients) for every mask: an image with no masked or no visible token has nothing to measure, contributes 0 and is
left out of batch means.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

AFFINITY_MODES = ("dot", "scaled", "cosine")
RANKING_MODES = ("intended", "literal")


MTO_CONFIG_ARGS = """\
        use_mto (`bool`, *optional*, defaults to `True`):
            Whether `forward` computes the MTO terms on the MTO stack's states H^0..H^L (heterogeneity, L_spa,
            L_e, L_r). When `False` none of that work is done and the model costs what the upstream model costs.
            Can be overridden per call with `forward(use_mto=...)`.
        mto_spa_layers (`list[int]`, *optional*, defaults to `[0]`):
            States of the MTO stack where the sparsity loss L_spa applies: 0 is the stack's initial embedding (with
            the mask token in place and the position embedding added), l the output of block l. The paper uses
            `[0]`, "the initial embedding stage".
        mto_affinity (`str`, *optional*, defaults to `"cosine"`):
            Affinity logits between tokens: `"cosine"` (cosine similarity divided by `mto_temperature`: no token's
            norm enters, so every token's largest affinity is its own), `"scaled"` (dot product divided by the square
            root of the stack's width, attention's convention; L_spa can then be met by one large-norm token that
            takes every row's affinity, which stalls the reconstruction's gradient into the encoder) or `"dot"` (the
            raw dot product, as the paper writes it; at ViT-B widths it saturates the softmax, so L_spa vanishes with
            zero gradient).
        mto_temperature (`float`, *optional*, defaults to 0.1):
            Temperature of the `"cosine"` affinity; unused otherwise.
        mto_ranking (`str`, *optional*, defaults to `"intended"`):
            Direction of the ranking loss L_r: `"intended"` pushes each layer's heterogeneity below the previous
            one's (the paper's text); `"literal"` is Eq. 7 as printed (for ablations).
        mto_eps (`float`, *optional*, defaults to 1e-6):
            The epsilon of L_e = 1 / (H^0 + eps).
"""


# No `from __future__ import annotations` in this module: huggingface_hub's `@strict` checks a field's type only when
# its annotation is a real type, not a string.
@dataclass(init=False, repr=False, eq=False)
class MTOConfigMixin:
    """The MTO fields of a model configuration, declared once for every method (documented in `MTO_CONFIG_ARGS`).

    A method's config lists it before its upstream config class (its fields then follow the upstream ones), puts
    `MTO_CONFIG_ARGS` in its docstring with `document_mto_fields`, and calls `check_mto_fields` from its
    `__post_init__`. The MTO loss *weights* are training arguments, not model configuration: a model returns each
    raw term and the trainer weights them. The configs derive from their folder's copy of this class (the one that
    travels as remote code), so check a config for MTO by its fields, not with `isinstance`.
    """

    use_mto: bool = True
    mto_spa_layers: list[int] | tuple[int, ...] = (0,)
    mto_affinity: str = "cosine"
    mto_temperature: float | int = 0.1
    mto_ranking: str = "intended"
    mto_eps: float = 1e-6

    def check_mto_fields(self, num_states: int) -> None:
        """Raise a `ValueError` naming the first bad MTO field; ``num_states`` = blocks of the MTO stack + 1."""
        self.mto_spa_layers = list(self.mto_spa_layers)  # JSON gives lists; a tuple default would not round-trip
        if self.mto_affinity not in AFFINITY_MODES:
            raise ValueError(f"mto_affinity must be one of {AFFINITY_MODES}, got {self.mto_affinity!r}")
        if self.mto_ranking not in RANKING_MODES:
            raise ValueError(f"mto_ranking must be one of {RANKING_MODES}, got {self.mto_ranking!r}")
        if not self.mto_eps > 0:
            raise ValueError(f"mto_eps must be > 0, got {self.mto_eps}")
        if not self.mto_temperature > 0:
            raise ValueError(f"mto_temperature must be > 0, got {self.mto_temperature}")
        bad = [layer for layer in self.mto_spa_layers if not 0 <= layer < num_states]
        if bad:
            raise ValueError(f"mto_spa_layers {self.mto_spa_layers} has {bad} outside [0, {num_states - 1}]")


def document_mto_fields(config_class: type) -> type:
    """Class decorator: put `MTO_CONFIG_ARGS` where the config's docstring has a line ``<MTO fields>``."""
    marker = "        <MTO fields>\n"
    if marker not in (config_class.__doc__ or ""):
        raise ValueError(f"{config_class.__name__}'s docstring has no {marker.strip()!r} line in its Args")
    config_class.__doc__ = config_class.__doc__.replace(marker, MTO_CONFIG_ARGS)
    return config_class


def _check_spa_layers(spa_layers, num_states: int) -> None:
    if num_states < 2:
        raise ValueError(f"need the initial embedding and at least one block output, got {num_states} states")
    bad = [layer for layer in spa_layers if not 0 <= layer < num_states]
    if bad:
        raise ValueError(f"spa_layers {list(spa_layers)} out of range: {bad} not in [0, {num_states - 1}]")


def _check_hidden_and_mask(hidden: torch.Tensor, mask: torch.Tensor) -> None:
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, N, D], got shape {list(hidden.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = masked), got dtype {mask.dtype}")
    if mask.shape != hidden.shape[:2]:
        raise ValueError(f"mask must be [B, N] = {list(hidden.shape[:2])}, got shape {list(mask.shape)}")


def _affinity_features(hidden: torch.Tensor, affinity: str, temperature: float) -> tuple[torch.Tensor, float]:
    """``[B, N, D]`` float32 features and the factor that turns their pairwise dot products into the affinity logits.

    The factor is applied to the logits rather than the features, so that "dot" and "scaled" use the states
    themselves as features: a scaled copy of every state would be one more ``[B, N, D]`` tensor per layer kept for
    the backward pass.
    """
    if affinity not in AFFINITY_MODES:
        raise ValueError(f"affinity must be one of {AFFINITY_MODES}, got {affinity!r}")
    x = hidden.float()
    if affinity == "cosine":
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for cosine affinity, got {temperature}")
        return F.normalize(x, dim=-1), 1.0 / temperature  # cos / T
    if affinity == "scaled":
        return x, x.shape[-1] ** -0.5
    return x, 1.0


def affinity_logits(hidden: torch.Tensor, affinity: str = "cosine", temperature: float = 0.1) -> torch.Tensor:
    """Token-token affinity logits in float32.

    Args:
        hidden: ``[B, N, D]`` token states (any float dtype).
        affinity: ``"cosine"`` (default: cosine similarity divided by ``temperature``), ``"scaled"``
            (``x_i . x_j / sqrt(D)``, attention's convention) or ``"dot"`` (raw ``x_i . x_j``, the paper's literal
            form, which saturates the softmax at ViT-B widths; see DESIGN.md).
        temperature: only used by ``"cosine"``.

    Returns:
        ``[B, N, N]`` float32 logits; row i is the affinity of token i to every token j.
    """
    # Autocast would run the matmul in bf16/fp16 again; the entropies need float32 logits.
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        x, scale = _affinity_features(hidden, affinity, temperature)
        return torch.bmm(x, x.transpose(1, 2)).mul_(scale)


# 1 + the log of the smallest normal float32 / float64 (constants: computing them per call would be operators too).
_LOG_TINY_FLOAT32 = math.log(torch.finfo(torch.float32).tiny) + 1.0
_LOG_TINY_FLOAT64 = math.log(torch.finfo(torch.float64).tiny) + 1.0


def _clamp_log_probs(log_p: torch.Tensor) -> torch.Tensor:
    """``log_p`` raised to at least 1 + the log of the smallest normal number of its dtype, float32 at least (-86.3;
    a half-precision bound, -8.7 for float16, would shift the entropies).

    Once training spreads the affinity logits over more than ~87 nats, many probabilities fall below float32's normal
    range; on a CPU, `exp` of such a log-probability and every product with the subnormal numbers it returns take a
    slow path (tens of times slower), which made the MTO terms' time grow with training. A clamped entry counts as
    p = 3.2e-38, adding < 3e-36 to its row's entropy, where its float32 value would have been subnormal or 0; the
    clamp's gradient (0 below the bound) is the entry's, up to the same amount.
    """
    return log_p.clamp(min=_LOG_TINY_FLOAT64 if log_p.dtype == torch.float64 else _LOG_TINY_FLOAT32)


def mean_row_entropy(logits: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Mean over selected rows of the entropy of softmax over selected columns: the quantity behind H (Eq. 2: masked
    rows over visible columns) and L_spa (Eq. 3: visible rows over all columns), for callers that take several of
    them from the same ``affinity_logits`` (the heterogeneity analysis).

    Args:
        logits: ``[B, N, N]`` float32.
        rows: ``[B, N]`` bool, the rows i to average over.
        cols: ``[B, N]`` bool, the columns j the softmax runs over.

    Returns:
        ``[B]`` float32; 0 for an image with no selected row or no selected column.
    """
    has_cols = cols.any(dim=1, keepdim=True)  # [B, 1]
    # An image with no selected column would give an all -inf row and NaN gradients; let it see every column
    # (any finite value) and zero its result below.
    cols = cols | ~has_cols
    col_mask = cols[:, None, :]  # [B, 1, N], broadcast over rows
    log_p = _clamp_log_probs(torch.log_softmax(logits.masked_fill(~col_mask, float("-inf")), dim=-1))
    # Excluded columns have p = 0; fill log p there before multiplying so 0 * -inf never appears (value or grad).
    log_p = log_p.masked_fill(~col_mask, 0.0)
    entropy = -(log_p.exp() * log_p).sum(dim=-1)  # [B, N]
    rows_f = rows.float()
    per_image = (entropy * rows_f).sum(dim=1) / rows_f.sum(dim=1).clamp(min=1.0)
    return per_image * has_cols.squeeze(1).float()


def has_masked_and_visible(mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: the images for which heterogeneity is defined (at least one masked and one visible token)."""
    return mask.any(dim=1) & (~mask).any(dim=1)


def _batch_mean(values: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values [..., B]`` over the ``valid [B]`` images (the last dimension); 0 when none is valid."""
    if valid is None:
        return values.mean(dim=-1)
    valid_f = valid.float()
    return (values * valid_f).sum(dim=-1) / valid_f.sum().clamp(min=1.0)


def mean_heterogeneity(heterogeneity: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Batch mean per layer of the per-image heterogeneity, over the images where it is defined.

    Args:
        heterogeneity: ``[B, L+1]`` H^0..H^L per image (`MTOTerms.heterogeneity`).
        mask: ``[B, N]``, nonzero = masked (bool, or the float masks of the models' outputs).

    Returns:
        ``[L+1]`` float32; 0 for a layer when no image has both masked and visible tokens.
    """
    return _batch_mean(heterogeneity.float().transpose(0, 1), has_masked_and_visible(mask.bool()))


def heterogeneity(
    hidden: torch.Tensor, mask: torch.Tensor, affinity: str = "cosine", temperature: float = 0.1
) -> torch.Tensor:
    """Eq. 2: heterogeneity H of masked tokens with respect to visible tokens, per image.

    H = mean over masked rows i of the entropy of softmax_j over **visible** j of affinity(i, j).

    Args:
        hidden: ``[B, N, D]`` token states, patch tokens only.
        mask: ``[B, N]`` bool, True = masked.

    Returns:
        ``[B]`` float32; 0 for an image with no masked or no visible token.
    """
    _check_hidden_and_mask(hidden, mask)
    return mean_row_entropy(affinity_logits(hidden, affinity, temperature), rows=mask, cols=~mask)


def sparsity_loss(
    hidden: torch.Tensor, mask: torch.Tensor, affinity: str = "cosine", temperature: float = 0.1
) -> torch.Tensor:
    """Eq. 3 (L_spa): entropy of each visible token's affinity over **all** tokens, averaged.

    The paper sums over visible rows; we average over the visible rows of each image and then over images, so
    the loss weight does not depend on the number of patches.

    Args:
        hidden: ``[B, N, D]`` token states, patch tokens only.
        mask: ``[B, N]`` bool, True = masked.

    Returns:
        scalar float32; images with no visible token are left out of the mean.
    """
    _check_hidden_and_mask(hidden, mask)
    logits = affinity_logits(hidden, affinity, temperature)
    return _sparsity_from_logits(logits, mask)


def _sparsity_from_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    all_cols = torch.ones_like(mask)
    per_image = mean_row_entropy(logits, rows=~mask, cols=all_cols)
    return _batch_mean(per_image, (~mask).any(dim=1))


def singularity_loss(h0: torch.Tensor, eps: float = 1e-6, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 6 (L_e): ``1 / (H^0 + eps)`` averaged over images; minimising it raises the heterogeneity of the
    initial embedding (the masked token's "data singularity").

    Args:
        h0: ``[B]`` heterogeneity of the initial embedding.
        eps: keeps the division finite.
        valid: optional ``[B]`` bool; images where H^0 is undefined (``has_masked_and_visible`` False) must be
            left out, since their H^0 = 0 would give 1 / eps.

    Returns:
        scalar float32.
    """
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    h0 = h0.float()
    if valid is not None:
        # Substitute 1 for undefined images before dividing so neither value nor gradient blows up.
        h0 = torch.where(valid, h0, torch.ones_like(h0))
    return _batch_mean(1.0 / (h0 + eps), valid)


def ranking_loss(hs: torch.Tensor, mode: str = "intended", valid: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 7 (L_r): ranking loss over the per-layer heterogeneity.

    ``"intended"`` (default): ``sum_{l=1..L} softplus(H^l - H^{l-1})``, which pushes each layer's heterogeneity
    below the previous one's ("progressively lower heterogeneity", the paper's text and Table 1).
    ``"literal"``: ``softplus(H^{l-1} - H^l)`` as printed in Eq. 7, which rewards heterogeneity that grows with
    depth; kept for ablations (see DESIGN.md).

    Args:
        hs: ``[L+1, B]`` heterogeneity H^0..H^L.
        mode: ``"intended"`` or ``"literal"``.
        valid: optional ``[B]`` bool of images to average over.

    Returns:
        scalar float32, the batch mean of the per-image sum over layers.
    """
    if mode not in RANKING_MODES:
        raise ValueError(f"ranking mode must be one of {RANKING_MODES}, got {mode!r}")
    if hs.dim() != 2 or hs.shape[0] < 2:
        raise ValueError(f"hs must be [L+1, B] with L >= 1, got shape {list(hs.shape)}")
    hs = hs.float()
    step = hs[1:] - hs[:-1]  # H^l - H^{l-1}, [L, B]
    if mode == "literal":
        step = -step
    return _batch_mean(F.softplus(step).sum(dim=0), valid)


@dataclass
class MTOTerms:
    """Raw MTO terms of one forward pass (unweighted; the trainer weights them).

    Attributes:
        heterogeneity: ``[B, L+1]`` H^0..H^L per image; 0 where undefined (no masked or no visible token).
        sparsity_loss: scalar L_spa (mean over ``spa_layers``).
        singularity_loss: scalar L_e.
        ranking_loss: scalar L_r.
    """

    heterogeneity: torch.Tensor
    sparsity_loss: torch.Tensor
    singularity_loss: torch.Tensor
    ranking_loss: torch.Tensor


def _collect_terms(
    hs: torch.Tensor, spa: list[torch.Tensor], eps: float, ranking: str, valid: torch.Tensor | None = None
) -> MTOTerms:
    """``hs [L+1, B]`` per-image heterogeneity and the per-layer L_spa values -> ``MTOTerms`` (the losses are batch
    means over the ``valid [B]`` images, or all of them; the heterogeneity stays per image)."""
    return MTOTerms(
        heterogeneity=hs.transpose(0, 1),
        sparsity_loss=torch.stack(spa).mean() if spa else hs.new_zeros(()),
        singularity_loss=singularity_loss(hs[0], eps, valid),
        ranking_loss=ranking_loss(hs, ranking, valid),
    )


def mto_terms(
    hidden_states: list[torch.Tensor] | tuple[torch.Tensor, ...],
    mask: torch.Tensor,
    spa_layers: list[int] | tuple[int, ...] = (0,),
    affinity: str = "cosine",
    temperature: float = 0.1,
    eps: float = 1e-6,
    ranking: str = "intended",
) -> MTOTerms:
    """All MTO terms from the states H^0..H^L of one stack, computing each layer's affinity once.

    Args:
        hidden_states: L+1 tensors ``[B, N, D]``: the initial embedding (index 0) and each block's output,
            patch tokens only.
        mask: ``[B, N]`` bool, True = masked.
        spa_layers: indices into ``hidden_states`` where L_spa applies (the paper: ``[0]``).

    Returns:
        ``MTOTerms``.
    """
    _check_spa_layers(spa_layers, len(hidden_states))
    valid = has_masked_and_visible(mask)
    per_layer, spa = [], []
    for layer, hidden in enumerate(hidden_states):
        _check_hidden_and_mask(hidden, mask)
        logits = affinity_logits(hidden, affinity, temperature)
        per_layer.append(mean_row_entropy(logits, rows=mask, cols=~mask))
        if layer in spa_layers:
            spa.append(_sparsity_from_logits(logits, mask))
    return _collect_terms(torch.stack(per_layer), spa, eps, ranking, valid)


def _scaled_bmm(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * a @ b`` in one kernel. Eager ignores the input at ``beta=0``, but a compiled epilogue may compute
    ``beta * input``: it is a view of `a`'s first column (finite, broadcast to the output, no allocation), never
    uninitialised memory, which could hold NaN or inf."""
    return torch.baddbmm(a[:, :, :1], a, b, beta=0.0, alpha=scale)


def _softmax_entropy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entropy of ``softmax(logits)`` over the last dimension, with what its backward needs.

    Args:
        logits: ``[B, M, K]`` float32.

    Returns:
        ``entropy [B, M]``, ``p [B, M, K]`` and ``log_p [B, M, K]`` (clamped by `_clamp_log_probs`, so that no
        entry of ``p`` nor of the backward's products is subnormal).
    """
    log_p = _clamp_log_probs(torch.log_softmax(logits, dim=-1))
    p = log_p.exp()
    return -(p * log_p).sum(dim=-1), p, log_p


def _entropy_grad_logits(entropy: torch.Tensor, p: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """``[B, M, K]`` ``p_ij (log p_ij + H_i)``: minus the gradient of the row entropies ``H [B, M]`` on the logits.

    Left unscaled: the loss weight, batch mean and logit scale make a factor near 1e-9 that would turn the smallest
    entries subnormal (slow on a CPU), so the caller applies it to the product's ``[B, N, D]`` result instead.
    """
    return (log_p + entropy.unsqueeze(-1)).mul_(p)


def _per_image_scale(grad: torch.Tensor, num_rows: int, logit_scale: float) -> torch.Tensor:
    """``[B, 1, 1]`` factor that turns `_entropy_grad_logits`'s products into the gradient of the features, given the
    gradient ``grad [B]`` of the mean over ``num_rows`` rows of the entropies."""
    return grad.mul(-logit_scale / num_rows)[:, None, None]


class _VisibleFirstEntropies(torch.autograd.Function):
    """One layer's Eq. 2 heterogeneity and, optionally, Eq. 3 sparsity entropy, with a hand-written backward.

    Autograd through ``slice -> split -> bmm -> log_softmax -> exp -> mul -> sum`` keeps five intermediates per term,
    zero-fills a buffer per slice and concatenates the split's gradients; here the closed form of the entropy's
    gradient needs only ``p`` and ``log p``, the layer's gradient is assembled by one concatenation, and a layer with
    both terms computes one ``visible @ patchesᵀ`` (Eq. 2's logits are its transposed visible-by-masked block; the
    saving is measured by `benchmarks/step_time.py`, figures in the README). The backward scales the ``[B, N, D]``
    gradient rather than the logits' (see `_entropy_grad_logits`), so each term's logits take two ``bmm``.

    Args (forward):
        features: ``[B, P + N, D]`` float32 affinity features; tokens ``[:P]`` (CLS) are ignored, ``[P:P+V]`` are
            the visible patches and the rest the masked ones.
        logit_scale: the logits are ``logit_scale * features @ featuresᵀ`` (see `_affinity_features`).
        num_prefix_tokens: P.
        num_visible: V, ``0 < V < N``.
        with_sparsity: also compute Eq. 3 for this layer.

    Returns:
        ``heterogeneity [B]`` (mean over masked rows of the entropy over visible columns) and, with
        ``with_sparsity``, ``sparsity [B]`` (mean over visible rows of the entropy over all patches).
    """

    @staticmethod
    def forward(ctx, features, logit_scale: float, num_prefix_tokens: int, num_visible: int, with_sparsity: bool):
        patches = features[:, num_prefix_tokens:]
        visible, masked = patches[:, :num_visible], patches[:, num_visible:]
        if with_sparsity:
            # Eq. 3: visible rows, all patches, [B, V, N]
            spa_logits = _scaled_bmm(visible, patches.transpose(1, 2), logit_scale)
            spa = _softmax_entropy(spa_logits)
            # Eq. 2's logits (masked rows, visible columns) are the transpose of Eq. 3's visible-by-masked block.
            het = _softmax_entropy(spa_logits[:, :, num_visible:].transpose(1, 2))
        else:
            spa = ()
            het = _softmax_entropy(_scaled_bmm(masked, visible.transpose(1, 2), logit_scale))  # Eq. 2, [B, M, V]
        ctx.logit_scale, ctx.num_prefix_tokens, ctx.num_visible = logit_scale, num_prefix_tokens, num_visible
        ctx.save_for_backward(features, *het, *spa)
        return (het[0].mean(dim=1), spa[0].mean(dim=1)) if with_sparsity else (het[0].mean(dim=1),)

    @staticmethod
    @torch.autograd.function.once_differentiable  # the closed form is not itself differentiated
    def backward(ctx, grad_het: torch.Tensor, grad_spa: torch.Tensor | None = None):
        features, *saved = ctx.saved_tensors
        num_prefix_tokens, num_visible = ctx.num_prefix_tokens, ctx.num_visible
        patches = features[:, num_prefix_tokens:]
        visible, masked = patches[:, :num_visible], patches[:, num_visible:]
        # The backward may run where autocast is on; the gradient, like the forward, stays in float32.
        with torch.autocast(device_type=features.device.type, enabled=False):
            het_entropy, het_p, het_log_p = saved[:3]
            grad_het_logits = _entropy_grad_logits(het_entropy, het_p, het_log_p)  # [B, M, V], unscaled
            het_scale = _per_image_scale(grad_het, het_p.shape[1], ctx.logit_scale)
            # each block scaled as it comes out of its product, then one concatenation
            parts = [
                torch.bmm(grad_het_logits.transpose(1, 2), masked).mul_(het_scale),
                torch.bmm(grad_het_logits, visible).mul_(het_scale),
            ]
            if num_prefix_tokens:
                parts.insert(0, features.new_zeros(features.shape[0], num_prefix_tokens, features.shape[2]))
            grad_features = torch.cat(parts, dim=1)
            grad_patches = grad_features[:, num_prefix_tokens:]
            if len(saved) > 3:
                # Eq. 3's logits are visible @ patchesᵀ, [B, V, N]; its own per-image factor, hence its own products.
                spa_entropy, spa_p, spa_log_p = saved[3:]
                grad_logits = _entropy_grad_logits(spa_entropy, spa_p, spa_log_p)
                spa_grad_patches = torch.bmm(grad_logits.transpose(1, 2), visible)  # [B, N, D]
                spa_grad_patches[:, :num_visible] += torch.bmm(grad_logits, patches)
                grad_patches.addcmul_(spa_grad_patches, _per_image_scale(grad_spa, spa_p.shape[1], ctx.logit_scale))
            return grad_features, None, None, None, None


def mto_terms_visible_first(
    hidden_states: list[torch.Tensor] | tuple[torch.Tensor, ...],
    num_visible: int,
    spa_layers: list[int] | tuple[int, ...] = (0,),
    affinity: str = "cosine",
    temperature: float = 0.1,
    eps: float = 1e-6,
    ranking: str = "intended",
    num_prefix_tokens: int = 0,
) -> MTOTerms:
    """`mto_terms` for states whose patch tokens are ordered visible first, then masked, in every image.

    MAE's decoder produces exactly this order before it unshuffles (and the SimMIM encoder runs in it when MTO is
    on), so the terms need no token selection at all: only the masked-by-visible (Eq. 2) and visible-by-all (Eq. 3)
    blocks of the affinity are computed.

    Args:
        hidden_states: L+1 tensors ``[B, P + N, D]``: P prefix tokens (the CLS token), which never count, then the
            N patches, ``[:num_visible]`` of them visible and the rest masked.
        num_visible: number of visible patches, ``0 < num_visible < N``.
        num_prefix_tokens: P. Passing the states whole, rather than ``state[:, 1:]``, spares a zero-filled gradient
            buffer per layer.
    """
    num_tokens = hidden_states[0].shape[1]
    if num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
    if not 0 < num_visible < num_tokens - num_prefix_tokens:
        raise ValueError(f"num_visible must be in (0, {num_tokens - num_prefix_tokens}), got {num_visible}")
    _check_spa_layers(spa_layers, len(hidden_states))
    per_layer, spa = [], []
    with torch.autocast(device_type=hidden_states[0].device.type, enabled=False):
        for layer, hidden in enumerate(hidden_states):
            if hidden.dim() != 3 or hidden.shape[1] != num_tokens:
                raise ValueError(f"every state must be [B, {num_tokens}, D], got shape {list(hidden.shape)}")
            features, scale = _affinity_features(hidden, affinity, temperature)
            entropies = _VisibleFirstEntropies.apply(
                features, scale, num_prefix_tokens, num_visible, layer in spa_layers
            )
            per_layer.append(entropies[0])  # Eq. 2, [B]
            spa.extend(entropy.mean() for entropy in entropies[1:])  # Eq. 3 (mean), []
    return _collect_terms(torch.stack(per_layer), spa, eps, ranking)
