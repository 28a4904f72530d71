"""The sequential definition of the average-linkage merge tree, as a test reference for `hf_mto.masking`.

`build_merge_tree` computes the tree in rounds of reciprocal nearest neighbours; this module merges one pair at a time,
exactly as DESIGN.md and the EHM paper define the tree (N - 1 merges of the globally most similar pair, Eq. 7 updates,
ties to the lowest flat index of the slot matrix). Batched over images, so the parity tests can run on a thousand
matrices in seconds.
"""

import math

import torch

from hf_mto.masking import MergeTree


def sequential_merge_tree(similarity: torch.Tensor) -> MergeTree:
    """One pair per step: the most similar pair of active clusters (lowest flat slot index among equal maxima) merges
    into the lower slot, its similarities the leaf-count-weighted averages of Eq. 7. ``similarity``: ``[B, N, N]``.
    (This was `hf_mto.masking.build_merge_tree` before the rounds; kept as its reference.)"""
    batch, n = similarity.shape[0], similarity.shape[1]
    device = similarity.device
    dtype = torch.promote_types(similarity.dtype, torch.float32)
    work = ((similarity + similarity.transpose(1, 2)) / 2).to(dtype).contiguous()
    work.diagonal(dim1=1, dim2=2).fill_(-math.inf)

    rows = torch.arange(batch, device=device)
    slot_node = torch.arange(n, device=device).repeat(batch, 1)  # [B, N] node id held by each slot
    merges = torch.empty(batch, n - 1, 2, dtype=torch.long, device=device)
    levels = torch.zeros(batch, 2 * n - 1, dtype=torch.long, device=device)
    sizes = torch.ones(batch, 2 * n - 1, dtype=torch.long, device=device)

    for k in range(n - 1):
        # The matrix is symmetric, so the lowest flat index of a maximum has row < column: the merged cluster goes
        # to slot `keep` < `drop`. No host synchronisation happens in this loop, so on a GPU it runs asynchronously.
        flat = work.view(batch, n * n).argmax(dim=1)
        keep, drop = flat // n, flat % n
        node_a, node_b = slot_node[rows, keep], slot_node[rows, drop]
        size_a, size_b = sizes[rows, node_a], sizes[rows, node_b]

        # Eq. 7. Retired slots stay -inf (-inf times a positive weight); the entries at `keep` and `drop` come out
        # -inf too because each child row has -inf on its own diagonal.
        weight_a = (size_a.to(dtype) / (size_a + size_b).to(dtype)).unsqueeze(1)
        merged = weight_a * work[rows, keep] + (1 - weight_a) * work[rows, drop]
        work[rows, keep] = merged
        work[rows, :, keep] = merged
        work[rows, drop] = -math.inf
        work[rows, :, drop] = -math.inf

        node = n + k
        merges[:, k, 0] = torch.minimum(node_a, node_b)
        merges[:, k, 1] = torch.maximum(node_a, node_b)
        levels[:, node] = torch.maximum(levels[rows, node_a], levels[rows, node_b]) + 1
        sizes[:, node] = size_a + size_b
        slot_node[rows, keep] = node

    return MergeTree(merges=merges, levels=levels, sizes=sizes, heights=levels[:, -1].clone())
