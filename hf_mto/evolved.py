"""Evolved hierarchical masking (EHM) from the model being trained: the model-side half of `hf_mto.masking`.

Per training step, on the training device and from the current weights (DESIGN.md, "Evolved hierarchical masking"):

1. `encoder_similarity`: one no-grad pass of the encoder over the *unmasked* images through its first
   `attention_layers` blocks; post-softmax attention averaged over heads and layers, CLS dropped, symmetrised.
2. `masking.build_merge_tree`: average-linkage tree over the patches, batched over images.
3. `masking.evolved_depth`: depth d = floor(h * (f0 + (f1 - f0) * t)) per image, t the training progress in [0, 1].
4. `masking.evolved_mask`: whole subtrees at depth d masked in random order, exactly round(ratio * N) patches.

The attention maps are computed from each block's own query/key projections, so the training forward keeps its
attention implementation (SDPA, flash): nothing is switched to eager. The unmasked embeddings and the blocks come
from the model's method (`hf_mto.methods`: `unmasked_embeddings`, `encoder_blocks`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .masking import attention_similarity, build_merge_tree, evolved_depth, evolved_mask
from .methods import method_for


def _layer_scaled(layer: torch.nn.Module, name: str, branch: torch.Tensor) -> torch.Tensor:
    """``branch`` times the block's layer scale ``name`` (BEiT's `lambda_1` / `lambda_2`) where it has one; as it is
    for a ViT block (no extra operator)."""
    scale = getattr(layer, name, None)
    return branch if scale is None else scale * branch


@torch.no_grad()
def encoder_similarity(model, pixel_values: torch.Tensor, attention_layers: int) -> torch.Tensor:
    """Patch-to-patch similarity from the model's own attention over the unmasked image.

    Args:
        model: a pre-training model of a registered method (ours or an upstream class it extends) whose
            `encoder_blocks` are ViT blocks: `layernorm_before`, `attention.q_proj/k_proj/v_proj/o_proj`, `mlp`,
            `layernorm_after`, and BEiT's layer scale `lambda_1` / `lambda_2` where the blocks have it; the method's
            `attention_bias` is added to the attention scores.
        pixel_values: ``[B, C, H, W]``.
        attention_layers: how many of the first blocks to average over (the EHM paper uses 6 of 12).

    Returns:
        ``[B, N, N]`` float32, symmetric, CLS excluded.
    """
    method = method_for(model)
    layers = method.encoder_blocks(model)
    if not 1 <= attention_layers <= len(layers):
        raise ValueError(f"evolved_attention_layers must be in [1, {len(layers)}], got {attention_layers}")
    hidden = method.unmasked_embeddings(model, pixel_values)  # [B, 1 + N, D]
    bias = method.attention_bias(model, pixel_values)  # [1, heads, T, T] or None
    batch_size, num_tokens, _ = hidden.shape
    maps = []
    for index, layer in enumerate(layers[:attention_layers]):
        attention = layer.attention
        normed = layer.layernorm_before(hidden)
        shape = (batch_size, num_tokens, -1, attention.head_dim)
        query = attention.q_proj(normed).view(shape).transpose(1, 2)  # [B, heads, T, hd]
        key = attention.k_proj(normed).view(shape).transpose(1, 2)
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attention.scaling
        probs = torch.softmax(scores if bias is None else scores + bias.float(), dim=-1)
        maps.append(probs.mean(dim=1, keepdim=True))  # [B, 1, T, T], mean over heads
        if index == attention_layers - 1:
            break  # the last block's output is never used: its attention map is all we need from it
        # The rest of the block (ViT pre-norm: x + attn(ln(x)), then x + mlp(ln(x)), each branch scaled by BEiT's
        # layer scale where the block has one; dropout off, as in eval) from the probabilities already at hand:
        # calling the block would project the queries and keys a second time.
        value = attention.v_proj(normed).view(shape).transpose(1, 2)
        context = torch.matmul(probs.to(value.dtype), value).transpose(1, 2).reshape(batch_size, num_tokens, -1)
        hidden = hidden + _layer_scaled(layer, "lambda_1", attention.o_proj(context))
        hidden = hidden + _layer_scaled(layer, "lambda_2", layer.mlp(layer.layernorm_after(hidden)))
    return attention_similarity(maps)


@dataclass
class EvolvedMasking:
    """Evolved hierarchical masks for a batch, from the model's current weights.

    Args:
        mask_ratio: fraction of patches masked; every row masks exactly ``num_masked = round(mask_ratio * N)``.
        num_patches: N, the model's patch count.
        attention_layers: encoder blocks whose attention defines the similarity.
        f0, f1: the depth schedule d = floor(h * (f0 + (f1 - f0) * t)), t the training progress in [0, 1]; EHM
            Eq. 14 is (0, 1).
    """

    mask_ratio: float
    num_patches: int
    attention_layers: int
    f0: float = 0.0
    f1: float = 1.0

    def __post_init__(self):
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if not 0.0 <= self.f0 <= self.f1 <= 1.0:
            raise ValueError(f"the depth schedule needs 0 <= f0 <= f1 <= 1, got f0={self.f0}, f1={self.f1}")

    @property
    def num_masked(self) -> int:
        """Patches masked per image (as `MaskGenerator.num_masked`)."""
        return round(self.mask_ratio * self.num_patches)

    def __call__(
        self, model, pixel_values: torch.Tensor, progress: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masks for ``pixel_values [B, C, H, W]`` at training progress t = ``progress`` in [0, 1].

        Returns ``mask [B, N]`` bool (True = masked), ``depth [B]`` and tree ``height [B]``.
        """
        similarity = encoder_similarity(model, pixel_values, self.attention_layers)
        if similarity.shape[1] != self.num_patches:
            raise ValueError(
                f"the model has {similarity.shape[1]} patches, the masking was built for {self.num_patches}"
            )
        tree = build_merge_tree(similarity)
        depth = evolved_depth(tree.heights, progress, self.f0, self.f1)
        return evolved_mask(tree, depth, self.mask_ratio), depth, tree.heights
