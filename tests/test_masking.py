"""Tests for hf_mto.masking: standard generators, MAE hand-off and evolved hierarchical masking.

Expected values are computed by hand in the comments next to them, not copied from the code's output.
"""

import itertools
import math
import statistics

import pytest
import torch
from conftest import TINY_MAE
from transformers import ViTMAEConfig, ViTMAEForPreTraining

from hf_mto.masking import (
    MaskGenerator,
    MergeTree,
    attention_similarity,
    beit_block_mask,
    build_merge_tree,
    cut_tree,
    evolved_depth,
    evolved_mask,
    mask_to_noise,
    random_mask,
    simmim_block_mask,
)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def two_group_similarity(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """16 patches split into two groups of 8 at random positions: similarity 0.9 within, 0.1 across, plus noise.

    Returns similarity [B, 16, 16] and group [B, 16] (0 or 1).
    """
    gen = seeded(seed)
    group = torch.stack([torch.randperm(16, generator=gen) < 8 for _ in range(batch)]).long()
    same = group.unsqueeze(2) == group.unsqueeze(1)
    noise = torch.rand(batch, 16, 16, generator=gen) * 0.01
    return torch.where(same, 0.9, 0.1) + (noise + noise.transpose(1, 2)) / 2, group


def parents_of(tree: MergeTree) -> torch.Tensor:
    """[B, 2N-1] parent node id, -1 for the root; computed independently of cut_tree."""
    batch, n = tree.levels.shape[0], tree.num_leaves
    parents = torch.full((batch, 2 * n - 1), -1, dtype=torch.long)
    for b, k in itertools.product(range(batch), range(n - 1)):
        for child in tree.merges[b, k].tolist():
            parents[b, child] = n + k
    return parents


def ancestors(tree: MergeTree, b: int, leaf: int) -> set[int]:
    """Node ids on the path from `leaf` to the root of image b, both included."""
    parents = parents_of(tree)[b].tolist()
    found, node = {leaf}, leaf
    while parents[node] != -1:
        node = parents[node]
        found.add(node)
    return found


# --------------------------------------------------------------------------------------------------------------------
# random_mask
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "num_patches", "ratio", "expected"),
    [
        (1, 16, 0.5, 8),
        (4, 196, 0.75, 147),  # 0.75 * 196 = 147
        (3, 64, 0.6, 38),  # 38.4 -> 38
        (5, 10, 0.25, 2),  # 2.5 -> 2: Python's round goes to even
        (2, 7, 0.5, 4),  # 3.5 -> 4: round half to even
        (6, 49, 0.9, 44),  # 44.1 -> 44
    ],
)
def test_random_mask_exact_count(batch, num_patches, ratio, expected):
    mask = random_mask(batch, num_patches, ratio, generator=seeded(0))
    assert mask.dtype == torch.bool and mask.shape == (batch, num_patches)
    assert mask.sum(dim=1).tolist() == [expected] * batch


def test_random_mask_is_uniform():
    # 4000 rows of 16 patches at ratio 0.5: each patch is masked with probability 8/16 = 0.5. The standard error of a
    # frequency over 4000 draws is sqrt(0.25 / 4000) = 0.0079, so 0.04 is a 5-sigma bound for each of the 16 patches.
    mask = random_mask(4000, 16, 0.5, generator=seeded(1))
    assert (mask.float().mean(dim=0) - 0.5).abs().max() < 0.04


def test_random_mask_determinism():
    first = random_mask(8, 64, 0.75, generator=seeded(3))
    assert torch.equal(first, random_mask(8, 64, 0.75, generator=seeded(3)))
    assert not torch.equal(first, random_mask(8, 64, 0.75, generator=seeded(4)))


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5, -0.2, float("nan")])
def test_random_mask_rejects_bad_ratio(ratio):
    with pytest.raises(ValueError, match=f"mask_ratio must be in \\(0, 1\\), got {ratio}"):
        random_mask(2, 16, ratio)


@pytest.mark.parametrize(("batch", "num_patches"), [(0, 16), (2, 0), (2, -3)])
def test_random_mask_rejects_bad_sizes(batch, num_patches):
    with pytest.raises(ValueError, match="must be a positive int, got (0|-3)"):
        random_mask(batch, num_patches, 0.5)


# --------------------------------------------------------------------------------------------------------------------
# simmim_block_mask
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "image", "model_patch", "mask_patch", "ratio", "blocks"),
    [
        (3, 32, 4, 8, 0.6, 10),  # 4x4 = 16 mask patches, 9.6 -> 10
        (2, 192, 4, 32, 0.6, 22),  # SimMIM's default: 6x6 = 36, 21.6 -> 22
        (5, 224, 16, 32, 0.6, 29),  # 7x7 = 49, 29.4 -> 29
        (1, 224, 16, 16, 0.75, 147),  # scale 1: plain random masking of 196 patches
    ],
)
def test_simmim_block_mask_counts_and_blocks(batch, image, model_patch, mask_patch, ratio, blocks):
    mask = simmim_block_mask(batch, image, model_patch, mask_patch, ratio, generator=seeded(0))
    side, scale = image // model_patch, mask_patch // model_patch
    assert mask.dtype == torch.bool and mask.shape == (batch, side * side)
    assert mask.sum(dim=1).tolist() == [blocks * scale * scale] * batch
    # Masked model patches come in aligned scale x scale squares: within each square all equal.
    squares = mask.view(batch, side // scale, scale, side // scale, scale)
    assert torch.equal(squares.amin(dim=(2, 4)), squares.amax(dim=(2, 4)))
    assert squares.amax(dim=(2, 4)).sum(dim=(1, 2)).tolist() == [blocks] * batch


def test_simmim_block_mask_row_major_layout():
    # image 8 px, model patch 2 px, mask patch 4 px: a 2x2 grid of mask patches over a 4x4 model grid. With 1 of 4
    # blocks masked (ratio 0.25), the masked model patches must be the four of one quadrant in row-major order.
    quadrants = [{0, 1, 4, 5}, {2, 3, 6, 7}, {8, 9, 12, 13}, {10, 11, 14, 15}]
    mask = simmim_block_mask(64, 8, 2, 4, 0.25, generator=seeded(5))
    for row in mask:
        assert set(row.nonzero().flatten().tolist()) in quadrants


def test_simmim_block_mask_determinism():
    first = simmim_block_mask(8, 192, 4, generator=seeded(7))
    assert torch.equal(first, simmim_block_mask(8, 192, 4, generator=seeded(7)))
    assert not torch.equal(first, simmim_block_mask(8, 192, 4, generator=seeded(8)))


def test_simmim_block_mask_rejects_bad_sizes():
    with pytest.raises(ValueError, match=r"image_size \(200\) must be divisible by mask_patch_size \(32\)"):
        simmim_block_mask(2, 200, 4, 32)
    with pytest.raises(ValueError, match=r"mask_patch_size \(32\) must be a multiple of model_patch_size \(6\)"):
        simmim_block_mask(2, 192, 6, 32)
    with pytest.raises(ValueError, match="got 1.5"):
        simmim_block_mask(2, 192, 4, 32, 1.5)


# --------------------------------------------------------------------------------------------------------------------
# beit_block_mask
# --------------------------------------------------------------------------------------------------------------------


def count_components(grid: torch.Tensor) -> int:
    """Number of 4-connected components of True cells in a 2-D bool grid."""
    height, width = grid.shape
    cells = {(r, c) for r, c in grid.nonzero().tolist()}
    components = 0
    while cells:
        components += 1
        stack = [cells.pop()]
        while stack:
            r, c = stack.pop()
            for neighbour in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if neighbour in cells:
                    cells.remove(neighbour)
                    stack.append(neighbour)
    return components


@pytest.mark.parametrize(
    ("batch", "grid", "ratio", "expected"),
    [
        (128, 14, 0.4, 78),  # 78.4 -> 78 (BEiT's 75 is 0.3827)
        (7, 14, 0.75, 147),
        (7, 14, 0.9, 176),  # 176.4: rectangles cannot fill this much, the top-up must
        (3, (8, 12), 0.5, 48),
        (5, 4, 0.3, 5),  # 4.8 -> 5; a 4x4 grid cannot hold a rectangle of >= 16, so all from the top-up
        (1, 14, 0.05, 10),  # 9.8 -> 10, below min_num_patches
    ],
)
def test_beit_block_mask_exact_count(batch, grid, ratio, expected):
    mask = beit_block_mask(batch, grid, ratio, generator=seeded(0))
    height, width = (grid, grid) if isinstance(grid, int) else grid
    assert mask.dtype == torch.bool and mask.shape == (batch, height * width)
    assert mask.sum(dim=1).tolist() == [expected] * batch


def test_beit_block_mask_single_square():
    # Target 16 = min_num_patches and aspect fixed at 1: the first rectangle is exactly 4x4 (area 16, side
    # round(sqrt(16)) = 4), it adds 16 <= 16 patches, and the target is reached with no top-up.
    mask = beit_block_mask(32, 14, 16 / 196, min_num_patches=16, min_aspect=1.0, generator=seeded(1))
    for row in mask.view(32, 14, 14):
        rows, cols = row.nonzero().unbind(1)
        assert row.sum() == 16
        assert rows.max() - rows.min() == 3 and cols.max() - cols.min() == 3


def test_beit_block_mask_is_blocky():
    # 59 of 196 patches (ratio 0.3): random masking scatters them into many components, BEiT's rectangles keep them
    # in a few. Seeded, so this is deterministic; the margin (half) is far from either side's typical value.
    beit = beit_block_mask(64, 14, 0.3, generator=seeded(2)).view(64, 14, 14)
    uniform = random_mask(64, 196, 0.3, generator=seeded(2)).view(64, 14, 14)
    beit_components = sum(count_components(g) for g in beit) / 64
    random_components = sum(count_components(g) for g in uniform) / 64
    assert beit_components < 0.5 * random_components


def test_beit_block_mask_determinism():
    first = beit_block_mask(16, 14, 0.4, generator=seeded(9))
    assert torch.equal(first, beit_block_mask(16, 14, 0.4, generator=seeded(9)))
    assert not torch.equal(first, beit_block_mask(16, 14, 0.4, generator=seeded(10)))


def test_beit_block_mask_rejects_bad_settings():
    with pytest.raises(ValueError, match="min_aspect must be > 0, got 0"):
        beit_block_mask(2, 14, 0.4, min_aspect=0.0)
    with pytest.raises(ValueError, match=r"max_aspect must be >= min_aspect \(0.5\), got 0.2"):
        beit_block_mask(2, 14, 0.4, min_aspect=0.5, max_aspect=0.2)
    with pytest.raises(ValueError, match="mask_ratio must be in \\(0, 1\\), got 1.0"):
        beit_block_mask(2, 14, 1.0)
    with pytest.raises(ValueError, match="grid height must be a positive int, got 0"):
        beit_block_mask(2, (0, 14), 0.4)
    with pytest.raises(ValueError, match=r"grid_size must be an int or a \(height, width\) pair, got \(4, 4, 4\)"):
        beit_block_mask(2, (4, 4, 4), 0.4)
    with pytest.raises(ValueError, match="min_num_patches must be a positive int, got 0"):
        beit_block_mask(2, 14, 0.4, min_num_patches=0)


# --------------------------------------------------------------------------------------------------------------------
# mask_to_noise
# --------------------------------------------------------------------------------------------------------------------


def test_mask_to_noise_hand_values():
    # noise = mask + position / N with N = 4: positions give 0, 0.25, 0.5, 0.75; masked ones add 1.
    mask = torch.tensor([[True, False, True, False], [False, False, True, True]])
    expected = torch.tensor([[1.0, 0.25, 1.5, 0.75], [0.0, 0.25, 1.5, 1.75]])
    noise = mask_to_noise(mask, expected_num_masked=2)
    assert noise.dtype == torch.float32
    assert torch.equal(noise, expected)


def test_mask_to_noise_rejects_bad_masks():
    with pytest.raises(ValueError, match=r"same number of patches, got counts \[2, 1\]"):
        mask_to_noise(torch.tensor([[True, True, False], [True, False, False]]))
    with pytest.raises(ValueError, match="mask has 1 masked patches per row, but the model masks 2"):
        mask_to_noise(torch.tensor([[True, False, False]]), expected_num_masked=2)
    with pytest.raises(ValueError, match="torch.float32 tensor of shape \\[1, 3\\]"):
        mask_to_noise(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="torch.bool tensor of shape \\[3\\]"):
        mask_to_noise(torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="torch.bool tensor, got list"):
        mask_to_noise([[True, False]])


@pytest.fixture(scope="module")
def tiny_mae():
    config = ViTMAEConfig(**{**TINY_MAE, "decoder_num_hidden_layers": 1})
    torch.manual_seed(0)
    return ViTMAEForPreTraining(config).eval()


def _two_level_tree_mask(batch: int, generator: torch.Generator) -> torch.Tensor:
    tree = build_merge_tree(torch.rand(batch, 64, 64, generator=generator))
    return evolved_mask(tree, tree.heights - 1, 0.75, generator=generator)


@pytest.mark.parametrize(
    "make_mask",
    [
        lambda g: random_mask(3, 64, 0.75, generator=g),
        lambda g: simmim_block_mask(3, 32, 4, 8, 0.75, generator=g),  # 12 of 16 blocks x 4 = 48
        lambda g: beit_block_mask(3, 8, 0.75, generator=g),
        lambda g: _two_level_tree_mask(3, g),
    ],
    ids=["random", "simmim", "beit", "evolved"],
)
def test_mask_to_noise_drives_hf_mae(tiny_mae, make_mask):
    # N = (32 / 4)^2 = 64; MAE keeps int(64 * (1 - 0.75)) = 16 patches, so every mask must have 48 masked.
    mask = make_mask(seeded(0))
    noise = mask_to_noise(mask, expected_num_masked=48)
    with torch.no_grad():
        outputs = tiny_mae(torch.randn(3, 3, 32, 32, generator=seeded(1)), noise=noise)
    assert torch.equal(outputs.mask.bool(), mask)


# --------------------------------------------------------------------------------------------------------------------
# build_merge_tree
# --------------------------------------------------------------------------------------------------------------------


def test_merge_tree_three_patches_by_hand():
    # S[0,2] = 0.8 is the largest: node 3 = {0, 2}, level 1. Its similarity to patch 1 is (0.2 + 0.5) / 2 = 0.35,
    # then node 4 = {1, 3} is the root at level 2.
    similarity = torch.tensor([[0.0, 0.2, 0.8], [0.2, 0.0, 0.5], [0.8, 0.5, 0.0]])
    tree = build_merge_tree(similarity.unsqueeze(0))
    assert tree.merges.tolist() == [[[0, 2], [1, 3]]]
    assert tree.levels.tolist() == [[0, 0, 0, 1, 2]]
    assert tree.sizes.tolist() == [[1, 1, 1, 2, 3]]
    assert tree.heights.tolist() == [2]


FIVE = torch.tensor(
    [
        [0.0, 0.9, 0.7, 0.4, 0.1],
        [0.9, 0.0, 0.7, 0.4, 0.1],
        [0.7, 0.7, 0.0, 0.0, 0.55],
        [0.4, 0.4, 0.0, 0.0, 0.3],
        [0.1, 0.1, 0.55, 0.3, 0.0],
    ]
)


def test_merge_tree_five_patches_uses_leaf_weighted_average():
    # step 0: S[0,1] = 0.9 -> node 5 = {0,1}; sim(5,2) = 0.7, sim(5,3) = 0.4, sim(5,4) = 0.1.
    # step 1: sim(5,2) = 0.7 beats S[2,4] = 0.55 -> node 6 = {0,1,2}, level 2, size 3.
    # step 2, Eq. 7 weights by leaf count: sim(6,3) = (2*0.4 + 1*0.0)/3 = 0.267, sim(6,4) = (2*0.1 + 0.55)/3 = 0.25,
    #   S[3,4] = 0.3 wins -> node 7 = {3,4}. (An unweighted average would give sim(6,4) = (0.1 + 0.55)/2 = 0.325
    #   and merge 4 into node 6 instead.)
    # step 3: node 8 = {6, 7}, the root at level max(2, 1) + 1 = 3.
    tree = build_merge_tree(FIVE.unsqueeze(0))
    assert tree.merges.tolist() == [[[0, 1], [2, 5], [3, 4], [6, 7]]]
    assert tree.levels.tolist() == [[0, 0, 0, 0, 0, 1, 2, 1, 3]]
    assert tree.sizes.tolist() == [[1, 1, 1, 1, 1, 2, 3, 2, 5]]
    assert tree.heights.tolist() == [3]


def test_merge_tree_ties_break_on_lowest_flat_index():
    # All similarities equal: step 0 takes slots (0, 1) -> node 4 in slot 0; step 1 the lowest flat index among the
    # remaining slots {0, 2, 3} is (0, 2) -> node 5 = {4, 2} in slot 0; step 2 merges slot 0 (node 5) with leaf 3.
    tree = build_merge_tree(torch.zeros(1, 4, 4))
    assert tree.merges.tolist() == [[[0, 1], [2, 4], [3, 5]]]
    assert tree.levels.tolist() == [[0, 0, 0, 0, 1, 2, 3]]
    assert tree.heights.tolist() == [3]


def test_merge_tree_tie_created_by_averaging():
    # step 0: S[0,1] = 0.9 at the lowest flat index -> node 6 = {0,1} in slot 0; sim(6,2) = (0.1 + 0.7)/2 = 0.4,
    #   sim(6,3) = 0.9, sim(6,4) = sim(6,5) = 0.3.
    # step 1: 0.9 ties at slot pairs (0,3), (3,4), (3,5); lowest is (0,3) -> node 7 = {6, 3} (size 3) in slot 0:
    #   sim(7,2) = (2*0.4 + 0.7)/3 = 0.5, sim(7,4) = (2*0.3 + 0.9)/3 = 0.5, sim(7,5) = 0.5.
    # step 2: S[2,5] = 0.7 -> node 8 = {2,5} in slot 2; sim(7,8) = (0.5 + 0.5)/2 = 0.5, sim(8,4) = 0.3.
    # step 3: sim(7,8) = sim(7,4) = 0.5 tie: slot pair (0,2) beats (0,4) -> node 9 = {7,8}; step 4: node 10 = {4,9}.
    # The step-3 tie arises from averages computed along different paths, so it also checks that the merged
    # similarities are combined exactly as Eq. 7 says (in float64 both come out as 0.5).
    similarity = torch.tensor(
        [
            [0.0, 0.9, 0.1, 0.9, 0.3, 0.3],
            [0.9, 0.0, 0.7, 0.9, 0.3, 0.3],
            [0.1, 0.7, 0.0, 0.7, 0.3, 0.7],
            [0.9, 0.9, 0.7, 0.0, 0.9, 0.9],
            [0.3, 0.3, 0.3, 0.9, 0.0, 0.3],
            [0.3, 0.3, 0.7, 0.9, 0.3, 0.0],
        ],
        dtype=torch.float64,
    )
    tree = build_merge_tree(similarity.unsqueeze(0))
    assert tree.merges.tolist() == [[[0, 1], [3, 6], [2, 5], [7, 8], [4, 9]]]
    assert tree.levels.tolist() == [[0, 0, 0, 0, 0, 0, 1, 2, 1, 3, 4]]
    assert tree.sizes[0, 6:].tolist() == [2, 3, 2, 5, 6]


def reference_full_argmax(similarity: torch.Tensor) -> tuple[list[list[int]], list[int]]:
    """Slow reference for one image following the documented rule literally: scan the whole slot matrix each step,
    take the lowest flat index among the maxima, put the merged node in the lower slot (Eq. 7 update)."""
    n = similarity.shape[0]
    work = similarity.clone()
    work.fill_diagonal_(float("-inf"))
    slot, sizes, levels, merges = list(range(n)), [1] * n, [0] * n, []
    for k in range(n - 1):
        keep, drop = sorted(divmod(int(work.argmax()), n))
        a, b = slot[keep], slot[drop]
        weight = sizes[a] / (sizes[a] + sizes[b])
        merged = weight * work[keep] + (1 - weight) * work[drop]
        work[keep], work[:, keep] = merged, merged
        work[drop], work[:, drop] = float("-inf"), float("-inf")
        slot[keep] = n + k
        sizes.append(sizes[a] + sizes[b])
        levels.append(max(levels[a], levels[b]) + 1)
        merges.append(sorted([a, b]))
    return merges, levels


def test_merge_tree_tie_rule_matches_full_scan():
    # Similarities on a grid of 3 values produce ties at almost every step, so this pins the documented tie rule
    # (lowest flat index of the slot matrix) for arbitrary inputs, not just the hand-made case above.
    gen = seeded(10)
    for n in (8, 20, 40):
        raw = (torch.rand(4, n, n, generator=gen, dtype=torch.float64) * 2).round() / 2
        similarity = torch.maximum(raw, raw.transpose(1, 2))
        tree = build_merge_tree(similarity)
        for b in range(4):
            merges, levels = reference_full_argmax(similarity[b])
            assert tree.merges[b].tolist() == merges
            assert tree.levels[b].tolist() == levels


def reference_upgma(similarity: torch.Tensor) -> tuple[list[list[int]], list[int]]:
    """Slow, independent average linkage for one image: cluster similarity = mean of leaf-to-leaf similarities."""
    n = similarity.shape[0]
    members = {i: [i] for i in range(n)}
    levels = [0] * n
    merges = []
    for k in range(n - 1):
        pairs = itertools.combinations(sorted(members), 2)
        a, b = max(pairs, key=lambda p: similarity[members[p[0]]][:, members[p[1]]].mean().item())
        members[n + k] = members.pop(a) + members.pop(b)
        levels.append(max(levels[a], levels[b]) + 1)
        merges.append([a, b])
    return merges, levels


def test_merge_tree_matches_reference_and_batches_independently():
    gen = seeded(11)
    for n in (2, 5, 9, 12):
        raw = torch.rand(3, n, n, generator=gen, dtype=torch.float64)
        similarity = (raw + raw.transpose(1, 2)) / 2
        tree = build_merge_tree(similarity)
        for b in range(3):
            merges, levels = reference_upgma(similarity[b])
            assert tree.merges[b].tolist() == merges
            assert tree.levels[b].tolist() == levels
            single = build_merge_tree(similarity[b : b + 1])
            assert torch.equal(single.merges[0], tree.merges[b])


def test_merge_tree_two_groups():
    similarity, group = two_group_similarity(4, seed=12)
    tree = build_merge_tree(similarity)
    assert tree.sizes[:, -1].tolist() == [16] * 4
    for b in range(4):
        # Each of the root's children is one whole group: all 8 leaves below it share one group label.
        for child in tree.merges[b, -1].tolist():
            leaves = [leaf for leaf in range(16) if child in ancestors(tree, b, leaf)]
            assert len(leaves) == 8
            assert len(set(group[b, leaves].tolist())) == 1


def test_merge_tree_rejects_bad_similarity():
    with pytest.raises(ValueError, match=r"square \[B, N, N\] tensor, got \[2, 4, 5\]"):
        build_merge_tree(torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match=r"got \[4, 4\]"):
        build_merge_tree(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="floating-point tensor, got torch.int64"):
        build_merge_tree(torch.zeros(1, 4, 4, dtype=torch.long))
    bad = torch.zeros(1, 4, 4)
    bad[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="must be finite"):
        build_merge_tree(bad)


# --------------------------------------------------------------------------------------------------------------------
# cut_tree
# --------------------------------------------------------------------------------------------------------------------


def test_cut_tree_five_patches_by_hand():
    # Tree from test_merge_tree_five_patches_...: node 5 = {0,1} (level 1), 6 = {0,1,2} (2), 7 = {3,4} (1), 8 root (3).
    tree = build_merge_tree(FIVE.unsqueeze(0))
    expected = {
        0: [0, 1, 2, 3, 4],
        1: [5, 5, 2, 7, 7],  # node 6 has level 2 > 1, so patch 2 stays alone
        2: [6, 6, 6, 7, 7],
        3: [8, 8, 8, 8, 8],
        7: [8, 8, 8, 8, 8],  # beyond the height: one group
    }
    for depth, labels in expected.items():
        assert cut_tree(tree, torch.tensor([depth])).tolist() == [labels]


def test_cut_tree_partitions_at_every_depth():
    gen = seeded(13)
    for n in (16, 33, 64):
        raw = torch.rand(3, n, n, generator=gen)
        tree = build_merge_tree(raw + raw.transpose(1, 2))
        parents = parents_of(tree)
        for depth in range(int(tree.heights.max()) + 2):
            labels = cut_tree(tree, torch.full((3,), depth))
            for b in range(3):
                groups, counts = labels[b].unique(return_counts=True)
                for root, count in zip(groups.tolist(), counts.tolist(), strict=True):
                    # the group is a whole subtree (all its leaves, nothing else) of level <= depth ...
                    assert tree.sizes[b, root] == count
                    assert tree.levels[b, root] <= depth
                    # ... and maximal: its parent is above the depth (or it is the root).
                    parent = parents[b, root]
                    assert parent == -1 or tree.levels[b, parent] > depth
            if depth == 0:
                assert torch.equal(labels, torch.arange(n).expand(3, n))


def test_cut_tree_per_image_depths_and_validation():
    tree = build_merge_tree(FIVE.expand(2, 5, 5))
    assert cut_tree(tree, torch.tensor([1, 2])).tolist() == [[5, 5, 2, 7, 7], [6, 6, 6, 7, 7]]
    with pytest.raises(ValueError, match=r"depth must be >= 0, got \[1, -1\]"):
        cut_tree(tree, torch.tensor([1, -1]))
    with pytest.raises(ValueError, match=r"integer tensor of shape \[2\], got torch.int64 tensor of shape \[3\]"):
        cut_tree(tree, torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match="got torch.float32"):
        cut_tree(tree, torch.tensor([1.0, 1.0]))


# --------------------------------------------------------------------------------------------------------------------
# evolved_mask
# --------------------------------------------------------------------------------------------------------------------


def test_evolved_mask_exact_counts_and_whole_groups_at_every_depth():
    gen = seeded(14)
    for n, ratio, expected in ((16, 0.5, 8), (49, 0.6, 29), (64, 0.75, 48)):  # 29.4 -> 29
        raw = torch.rand(4, n, n, generator=gen)
        tree = build_merge_tree(raw + raw.transpose(1, 2))
        for depth in range(int(tree.heights.max()) + 2):
            depths = torch.full((4,), depth)
            mask = evolved_mask(tree, depths, ratio, generator=gen)
            assert mask.sum(dim=1).tolist() == [expected] * 4
            # Eq. 15-16: whole groups, except at most one truncated group.
            labels = cut_tree(tree, depths)
            for b in range(4):
                partial = [g for g in labels[b].unique() if 0 < mask[b, labels[b] == g].sum() < (labels[b] == g).sum()]
                assert len(partial) <= 1


def test_evolved_mask_two_groups_masks_one_whole_group():
    similarity, group = two_group_similarity(4, seed=15)
    tree = build_merge_tree(similarity)
    depth = tree.heights - 1
    # At height - 1 the cut is exactly the root's two children, i.e. the two groups.
    labels = cut_tree(tree, depth)
    for b in range(4):
        assert sorted(labels[b].unique().tolist()) == sorted(tree.merges[b, -1].tolist())
        assert torch.equal(labels[b] == labels[b, 0], group[b] == group[b, 0])
    # Ratio 0.5 of 16 = 8 = one group: every mask is one whole group, and over 20 draws both groups get picked.
    picked = set()
    for seed in range(20):
        mask = evolved_mask(tree, depth, 0.5, generator=seeded(seed))
        for b in range(4):
            assert torch.equal(mask[b], group[b] == 0) or torch.equal(mask[b], group[b] == 1)
        picked.add(int(group[0][mask[0]][0]))
    assert picked == {0, 1}


def test_evolved_mask_truncates_the_last_group_at_random():
    # Two groups of 8 at depth height - 1, ratio 0.25: 4 masked patches, all inside the group visited first (chosen
    # with probability 1/2), as a uniformly random 4 of its 8 (probability 1/2). Each patch is therefore masked with
    # probability 1/4; over 2000 draws the standard error is sqrt(0.1875 / 2000) = 0.0097, so 0.05 is ~5 sigma.
    similarity, group = two_group_similarity(1, seed=23)
    tree = build_merge_tree(similarity.expand(2000, 16, 16))
    mask = evolved_mask(tree, tree.heights - 1, 0.25, generator=seeded(24))
    masked_groups = torch.where(mask, group, -1)
    assert all(len(set(row.tolist()) - {-1}) == 1 for row in masked_groups)
    assert (mask.float().mean(dim=0) - 0.25).abs().max() < 0.05


def test_evolved_mask_depth_zero_is_random_masking():
    # Depth 0 on a strongly grouped tree must ignore the groups. 4000 draws of 16 patches at ratio 0.5 (8 masked):
    # each patch is masked with probability 8/16 = 0.5 (standard error sqrt(0.25/4000) = 0.0079) and each pair with
    # probability 8*7 / (16*15) = 0.2333 (standard error sqrt(0.2333*0.7667/4000) = 0.0067). Tolerances of 0.04 and
    # 0.035 are ~5 sigma, so the 16 + 120 checks fail by chance with probability < 1e-4; a grouped mask would put
    # same-group pairs near 0.5.
    similarity, _ = two_group_similarity(1, seed=16)
    tree = build_merge_tree(similarity.expand(4000, 16, 16))
    mask = evolved_mask(tree, torch.zeros(4000, dtype=torch.long), 0.5, generator=seeded(17)).float()
    assert (mask.mean(dim=0) - 0.5).abs().max() < 0.04
    pairs = (mask.T @ mask) / 4000
    off_diagonal = ~torch.eye(16, dtype=torch.bool)
    assert (pairs[off_diagonal] - 8 * 7 / (16 * 15)).abs().max() < 0.035


def test_evolved_mask_determinism_and_validation():
    raw = torch.rand(8, 64, 64, generator=seeded(18))
    tree = build_merge_tree(raw + raw.transpose(1, 2))
    depth = tree.heights // 2
    first = evolved_mask(tree, depth, 0.75, generator=seeded(19))
    assert torch.equal(first, evolved_mask(tree, depth, 0.75, generator=seeded(19)))
    assert not torch.equal(first, evolved_mask(tree, depth, 0.75, generator=seeded(20)))
    for ratio in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=f"mask_ratio must be in \\(0, 1\\), got {ratio}"):
            evolved_mask(tree, depth, ratio)
    with pytest.raises(ValueError, match="depth must be >= 0"):
        evolved_mask(tree, depth - 100, 0.5)


# --------------------------------------------------------------------------------------------------------------------
# evolved_depth
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("progress", "f0", "f1", "expected"),
    [
        (0.0, 0.0, 1.0, [0, 0, 0]),
        (0.33, 0.0, 1.0, [3, 2, 0]),  # 10*0.33 = 3.3, 7*0.33 = 2.31
        (0.5, 0.0, 1.0, [5, 3, 0]),  # 3.5 -> 3
        (0.999, 0.0, 1.0, [9, 6, 0]),  # the last step of a run: one level short of the height
        (1.0, 0.0, 1.0, [10, 7, 0]),  # the end of training reaches the height
        (0.0, 0.2, 0.6, [2, 1, 0]),  # f0 = 0.2: 2.0, 1.4
        (0.5, 0.2, 0.6, [4, 2, 0]),  # f = 0.4: 4.0, 2.8
        (1.0, 0.2, 0.6, [6, 4, 0]),  # f = 0.6: 6.0, 4.2
    ],
)
def test_evolved_depth_schedule(progress, f0, f1, expected):
    heights = torch.tensor([10, 7, 0])
    depth = evolved_depth(heights, progress, f0, f1)
    assert depth.dtype == torch.long
    assert depth.tolist() == expected
    # Resuming at the same progress gives the same depth: it is a pure function of the progress.
    assert evolved_depth(heights, progress, f0, f1).tolist() == expected


def test_evolved_depth_exact_on_decimal_fractions():
    # 100 * 0.29 is 28.999999999999996 in floating point; the intended depth is 29.
    assert evolved_depth(torch.tensor([100]), 1.0, 0.0, 0.29).tolist() == [29]
    assert evolved_depth(torch.tensor([100]), 0.29).tolist() == [29]
    assert evolved_depth(torch.tensor([100]), 29 / 100).tolist() == [29]  # a step fraction, as the trainer passes


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"f0": 0.7, "f1": 0.3}, "f0=0.7, f1=0.3"),
        ({"f0": -0.1}, "f0=-0.1"),
        ({"f1": 1.5}, "f1=1.5"),
        ({"progress": -0.1}, r"progress must be in \[0, 1\] \(the fraction of training done\), got -0.1"),
        ({"progress": 3}, r"progress must be in \[0, 1\] \(the fraction of training done\), got 3"),  # an epoch
        ({"progress": float("nan")}, "got nan"),
    ],
)
def test_evolved_depth_rejects_bad_settings(kwargs, message):
    arguments = {"heights": torch.tensor([5]), "progress": 0.1, **kwargs}
    with pytest.raises(ValueError, match=message):
        evolved_depth(**arguments)


def test_evolved_depth_rejects_float_heights():
    with pytest.raises(ValueError, match="integer tensor, got torch.float32"):
        evolved_depth(torch.tensor([5.0]), 0.1)


# --------------------------------------------------------------------------------------------------------------------
# attention_similarity
# --------------------------------------------------------------------------------------------------------------------


def test_attention_similarity_by_hand():
    # 2 layers x 2 heads, 1 CLS + 2 patches. Patch blocks (CLS row/column filled with 9 to show they are dropped):
    patch_blocks = [
        [[[0.5, 0.1], [0.3, 0.2]], [[0.1, 0.1], [0.1, 0.6]]],  # layer 0, heads 0 and 1
        [[[0.2, 0.4], [0.0, 0.2]], [[0.4, 0.2], [0.2, 0.2]]],  # layer 1
    ]
    attentions = torch.full((2, 1, 2, 3, 3), 9.0)
    attentions[:, 0, :, 1:, 1:] = torch.tensor(patch_blocks)
    # mean of the four blocks: [[1.2/4, 0.8/4], [0.6/4, 1.2/4]] = [[0.3, 0.2], [0.15, 0.3]];
    # symmetrised off-diagonal (0.2 + 0.15) / 2 = 0.175.
    expected = torch.tensor([[[0.3, 0.175], [0.175, 0.3]]])
    assert torch.allclose(attention_similarity(attentions), expected, atol=1e-6)
    assert torch.allclose(attention_similarity(list(attentions)), expected, atol=1e-6)
    # Layer 0 alone: head mean [[0.6/2, 0.2/2], [0.4/2, 0.8/2]] = [[0.3, 0.1], [0.2, 0.4]], off-diagonal 0.15.
    layer0 = torch.tensor([[[0.3, 0.15], [0.15, 0.4]]])
    assert torch.allclose(attention_similarity(tuple(attentions[:1])), layer0, atol=1e-6)


def test_attention_similarity_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[L, B, heads, N\+1, N\+1\], got shape \[2, 4, 5, 5\]"):
        attention_similarity(torch.zeros(2, 4, 5, 5))
    with pytest.raises(ValueError, match=r"got \[2, 4, 6, 6\] at layer 1"):
        attention_similarity([torch.zeros(2, 4, 5, 5), torch.zeros(2, 4, 6, 6)])
    with pytest.raises(ValueError, match=r"got \[2, 4, 5, 4\] at layer 0"):
        attention_similarity([torch.zeros(2, 4, 5, 4)])
    with pytest.raises(ValueError, match="at least one layer"):
        attention_similarity([])


def test_attention_to_mask_pipeline():
    # Attention rows of a softmax over 65 tokens (CLS + 64 patches) -> tree -> depth schedule -> mask.
    attentions = torch.randn(2, 3, 4, 65, 65, generator=seeded(21)).softmax(dim=-1)
    similarity = attention_similarity(attentions)
    assert similarity.shape == (3, 64, 64) and torch.equal(similarity, similarity.transpose(1, 2))
    tree = build_merge_tree(similarity)
    depth = evolved_depth(tree.heights, progress=0.5)
    assert torch.equal(depth, tree.heights // 2)
    assert evolved_mask(tree, depth, 0.75, generator=seeded(22)).sum(dim=1).tolist() == [48] * 3


def test_square_side_accepts_int_and_pairs():
    from hf_mto.masking import square_side

    assert square_side(32) == 32 and square_side((224, 224)) == 224 and square_side([16, 16]) == 16


def test_beit_rectangles_stop_at_the_block_share_and_the_per_rectangle_cap():
    from hf_mto.masking import _beit_rectangles

    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    counts = [sum(_beit_rectangles(14, 14, 120, 16, 60, log_aspect, seeded(i), None)) for i in range(50)]
    # BootMAE's official generator: rectangles over 120 of 196 patches, never more
    assert max(counts) == 120 and statistics.mean(counts) > 110
    # a cap of one patch per rectangle can still only add single patches: exactly the target, one at a time
    assert sum(_beit_rectangles(14, 14, 30, 1, 1, log_aspect, seeded(0), None)) == 30


def test_bootmae_block_masks_the_exact_count_with_rectangles_then_random_patches():
    generator = MaskGenerator("bootmae_block", 224, 16, 0.75)
    assert generator.num_masked == 147
    masks = generator(64, generator=seeded(0))
    assert masks.shape == (64, 196) and (masks.sum(dim=1) == 147).all()

    # the 27 random patches of the top-up show as masked patches with no masked 4-neighbour far more often than in
    # a pure BEiT block mask of the same count
    def isolated(mask):
        grid = mask.view(-1, 14, 14).float()
        neighbours = torch.nn.functional.conv2d(
            grid[:, None], torch.tensor([[[[0.0, 1, 0], [1, 0, 1], [0, 1, 0]]]]), padding=1
        )[:, 0]
        return ((grid > 0) & (neighbours == 0)).sum().item() / len(mask)

    beit = MaskGenerator("beit_block", 224, 16, 0.75)(64, generator=seeded(0))
    assert isolated(masks) > 2 * isolated(beit) + 1
    with pytest.raises(ValueError, match="block_ratio"):
        beit_block_mask(2, 14, 0.5, block_ratio=0.9)
