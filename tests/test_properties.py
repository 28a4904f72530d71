"""Property-based tests (hypothesis) of hf_mto.mto and hf_mto.masking over random shapes, masks and magnitudes.

The hand-computed cases live in test_mto.py and test_masking.py; these check invariants on many random inputs:
MTO terms and their gradients are finite for every mask (all masked, none masked) and magnitude (up to 1e4), stay
within their entropy bounds, and the visible-first fast path agrees with the general one; mask generators give
exact counts, shapes and dtypes; merge trees are valid average-linkage trees and every cut partitions the patches.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_mto import masking, mto

SETTINGS = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

MAGNITUDES = [1e-3, 0.1, 1.0, 10.0, 1e2, 1e4]
RATIOS = st.floats(min_value=0.01, max_value=0.99, allow_nan=False)


# ---------------------------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------------------------


@st.composite
def masks(draw, batch: int, num_tokens: int) -> torch.Tensor:
    """[B, N] bool; each row random (mostly mixed), all masked or none masked."""
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    rows = []
    for _ in range(batch):
        kind = draw(st.sampled_from(["random", "all", "random", "none", "random"]))
        if kind == "all":
            rows.append(torch.ones(num_tokens, dtype=torch.bool))
        elif kind == "none":
            rows.append(torch.zeros(num_tokens, dtype=torch.bool))
        else:
            rows.append(torch.rand(num_tokens, generator=generator) < draw(st.floats(0.05, 0.95)))
    return torch.stack(rows)


@st.composite
def mto_inputs(draw, magnitudes=tuple(MAGNITUDES)):
    """L+1 states [B, N, D] (requiring grad) of random magnitude and a mask with any mix of row kinds."""
    batch = draw(st.integers(1, 3))
    num_tokens = draw(st.integers(2, 20))
    dim = draw(st.integers(1, 8))
    layers = draw(st.integers(1, 4))
    magnitude = draw(st.sampled_from(magnitudes))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    states = [
        (torch.randn(batch, num_tokens, dim, generator=generator) * magnitude).requires_grad_()
        for _ in range(layers + 1)
    ]
    mask = draw(masks(batch, num_tokens))
    spa_layers = sorted(draw(st.sets(st.integers(0, layers), min_size=1)))
    return states, mask, spa_layers


def _finite_terms_and_grads(terms: mto.MTOTerms, states: list[torch.Tensor]) -> None:
    for name in ("heterogeneity", "sparsity_loss", "singularity_loss", "ranking_loss"):
        value = getattr(terms, name)
        assert value.dtype == torch.float32, name
        assert torch.isfinite(value).all(), (name, value)
    total = terms.sparsity_loss + terms.singularity_loss + terms.ranking_loss + terms.heterogeneity.sum()
    grads = torch.autograd.grad(total, states, allow_unused=True)
    for layer, grad in enumerate(grads):
        assert grad is None or torch.isfinite(grad).all(), f"non-finite gradient at layer {layer}"


# ---------------------------------------------------------------------------------------------------------------
# MTO math
# ---------------------------------------------------------------------------------------------------------------


@SETTINGS
@given(inputs=mto_inputs(), affinity=st.sampled_from(mto.AFFINITY_MODES), ranking=st.sampled_from(mto.RANKING_MODES))
def test_mto_terms_are_finite_with_finite_gradients(inputs, affinity, ranking):
    states, mask, spa_layers = inputs
    terms = mto.mto_terms(states, mask, spa_layers=spa_layers, affinity=affinity, ranking=ranking)
    assert terms.heterogeneity.shape == (mask.shape[0], len(states))
    _finite_terms_and_grads(terms, states)
    assert terms.ranking_loss >= 0 and terms.sparsity_loss >= 0 and terms.singularity_loss >= 0
    if not mto.has_masked_and_visible(mask).any():  # nothing to measure anywhere: every term is 0
        assert terms.singularity_loss == 0 and terms.ranking_loss == 0 and (terms.heterogeneity == 0).all()


@SETTINGS
@given(inputs=mto_inputs(magnitudes=(1e2, 1e3, 1e4)), affinity=st.sampled_from(mto.AFFINITY_MODES))
def test_mto_terms_are_finite_at_large_magnitudes(inputs, affinity):
    states, mask, spa_layers = inputs
    _finite_terms_and_grads(mto.mto_terms(states, mask, spa_layers=spa_layers, affinity=affinity), states)


@SETTINGS
@given(inputs=mto_inputs(), affinity=st.sampled_from(mto.AFFINITY_MODES))
def test_heterogeneity_and_sparsity_are_bounded_entropies(inputs, affinity):
    states, mask, _ = inputs
    hidden = states[0]
    het = mto.heterogeneity(hidden, mask, affinity=affinity)
    assert het.shape == (hidden.shape[0],) and torch.isfinite(het).all()
    num_visible = (~mask).sum(dim=1).float()
    defined = mto.has_masked_and_visible(mask)
    # An entropy over K columns lies in [0, log K]; undefined images give exactly 0.
    assert (het >= -1e-5).all()
    assert (het <= torch.log(num_visible.clamp(min=1)) + 1e-4).all()
    assert (het[~defined] == 0).all()
    spa = mto.sparsity_loss(hidden, mask, affinity=affinity)
    assert torch.isfinite(spa) and -1e-5 <= spa <= math.log(hidden.shape[1]) + 1e-4
    (grad,) = torch.autograd.grad(het.sum() + spa, hidden)
    assert torch.isfinite(grad).all()


@SETTINGS
@given(
    hs=st.integers(0, 2**31 - 1).flatmap(
        lambda seed: st.tuples(st.just(seed), st.integers(2, 5), st.integers(1, 3), st.sampled_from(MAGNITUDES))
    ),
    mode=st.sampled_from(mto.RANKING_MODES),
    data=st.data(),
)
def test_singularity_and_ranking_losses_are_finite(hs, mode, data):
    seed, states, batch, magnitude = hs
    generator = torch.Generator().manual_seed(seed)
    values = (torch.rand(states, batch, generator=generator) * magnitude).requires_grad_()
    # Some heterogeneities exactly 0 (undefined images), as the models produce them.
    zero = torch.tensor(data.draw(st.lists(st.booleans(), min_size=batch, max_size=batch)))
    hs_tensor = torch.where(zero, torch.zeros_like(values), values)
    valid = ~zero
    eps = data.draw(st.sampled_from([1e-6, 1e-3, 1.0]))
    loss_e = mto.singularity_loss(hs_tensor[0], eps=eps, valid=valid)
    loss_r = mto.ranking_loss(hs_tensor, mode=mode, valid=valid)
    assert torch.isfinite(loss_e) and torch.isfinite(loss_r) and loss_r >= 0
    if not valid.any():
        assert loss_e == 0 and loss_r == 0
    (grad,) = torch.autograd.grad(loss_e + loss_r, values)
    assert torch.isfinite(grad).all()
    # Without `valid`, an H^0 of 0 costs 1/eps: large but finite.
    assert torch.isfinite(mto.singularity_loss(hs_tensor[0], eps=eps))


@st.composite
def visible_first_inputs(draw):
    batch = draw(st.integers(1, 3))
    num_tokens = draw(st.integers(2, 20))
    dim = draw(st.integers(1, 8))
    layers = draw(st.integers(1, 4))
    num_visible = draw(st.integers(1, num_tokens - 1))
    # Moderate magnitudes: with 1e4 the logits reach ~1e8 and float32 rounding alone (different bmm shapes) moves
    # them by whole units, so the two paths legitimately differ there; finiteness at 1e4 is tested separately.
    magnitude = draw(st.sampled_from([0.01, 0.1, 1.0, 2.0]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    states = [
        (torch.randn(batch, num_tokens, dim, generator=generator, dtype=torch.float64) * magnitude).float()
        for _ in range(layers + 1)
    ]
    states = [state.requires_grad_() for state in states]
    keys = torch.rand(batch, num_tokens, generator=generator)
    mask = keys.argsort(dim=1).argsort(dim=1) >= num_visible  # exactly N - num_visible masked, anywhere
    spa_layers = sorted(draw(st.sets(st.integers(0, layers), min_size=1)))
    return states, mask, num_visible, spa_layers


@SETTINGS
@given(inputs=visible_first_inputs(), affinity=st.sampled_from(mto.AFFINITY_MODES))
def test_visible_first_path_agrees_with_general_path(inputs, affinity):
    states, mask, num_visible, spa_layers = inputs
    general = mto.mto_terms(states, mask, spa_layers=spa_layers, affinity=affinity)
    dim = states[0].shape[-1]
    order = torch.argsort(mask.to(torch.uint8), dim=1, stable=True).unsqueeze(-1).expand(-1, -1, dim)
    reordered = [torch.gather(state, 1, order) for state in states]
    fast = mto.mto_terms_visible_first(reordered, num_visible, spa_layers=spa_layers, affinity=affinity)
    for name in ("heterogeneity", "sparsity_loss", "singularity_loss", "ranking_loss"):
        torch.testing.assert_close(getattr(fast, name), getattr(general, name), rtol=1e-4, atol=1e-5, msg=name)
    grads = [
        torch.autograd.grad(t.sparsity_loss + t.ranking_loss + t.heterogeneity.sum(), states) for t in (general, fast)
    ]
    for layer, (g_general, g_fast) in enumerate(zip(*grads, strict=True)):
        torch.testing.assert_close(g_fast, g_general, rtol=1e-3, atol=1e-4, msg=f"layer {layer}")


@SETTINGS
@given(inputs=visible_first_inputs(), magnitude=st.sampled_from([1e2, 1e4]), affinity=st.sampled_from(["dot"]))
def test_visible_first_path_is_finite_at_large_magnitudes(inputs, magnitude, affinity):
    states, _, num_visible, spa_layers = inputs
    states = [(state.detach() * magnitude).requires_grad_() for state in states]
    terms = mto.mto_terms_visible_first(states, num_visible, spa_layers=spa_layers, affinity=affinity)
    _finite_terms_and_grads(terms, states)


# ---------------------------------------------------------------------------------------------------------------
# Standard mask generators
# ---------------------------------------------------------------------------------------------------------------


def _check_mask(mask: torch.Tensor, batch: int, num_patches: int, num_masked: int) -> None:
    assert mask.dtype == torch.bool and mask.shape == (batch, num_patches)
    assert mask.sum(dim=1).tolist() == [num_masked] * batch


@SETTINGS
@given(batch=st.integers(1, 4), num_patches=st.integers(1, 64), ratio=RATIOS, seed=st.integers(0, 2**31 - 1))
def test_random_mask_exact_count(batch, num_patches, ratio, seed):
    mask = masking.random_mask(batch, num_patches, ratio, generator=torch.Generator().manual_seed(seed))
    _check_mask(mask, batch, num_patches, round(ratio * num_patches))


@SETTINGS
@given(
    batch=st.integers(1, 3),
    model_patch=st.sampled_from([1, 2, 4]),
    scale=st.integers(1, 3),
    grid=st.integers(1, 4),
    ratio=RATIOS,
    seed=st.integers(0, 2**31 - 1),
)
def test_simmim_block_mask_exact_count_and_whole_blocks(batch, model_patch, scale, grid, ratio, seed):
    mask_patch = model_patch * scale
    image = mask_patch * grid
    mask = masking.simmim_block_mask(
        batch, image, model_patch, mask_patch, ratio, generator=torch.Generator().manual_seed(seed)
    )
    side = grid * scale
    _check_mask(mask, batch, side * side, round(ratio * grid * grid) * scale * scale)
    # Every scale x scale block of model patches is all masked or all visible.
    blocks = mask.view(batch, grid, scale, grid, scale).float().mean(dim=(2, 4))
    assert ((blocks == 0) | (blocks == 1)).all()


@SETTINGS
@given(
    batch=st.integers(1, 3),
    height=st.integers(1, 8),
    width=st.integers(1, 8),
    ratio=RATIOS,
    min_num_patches=st.integers(1, 16),
    min_aspect=st.floats(0.1, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_beit_block_mask_exact_count(batch, height, width, ratio, min_num_patches, min_aspect, seed):
    mask = masking.beit_block_mask(
        batch,
        (height, width),
        ratio,
        min_num_patches=min_num_patches,
        min_aspect=min_aspect,
        generator=torch.Generator().manual_seed(seed),
    )
    _check_mask(mask, batch, height * width, round(ratio * height * width))


@SETTINGS
@given(batch=st.integers(1, 3), num_patches=st.integers(2, 30), data=st.data())
def test_mask_to_noise_makes_mae_keep_exactly_the_visible_patches(batch, num_patches, data):
    num_masked = data.draw(st.integers(1, num_patches - 1))
    keys = torch.rand(batch, num_patches, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 999))))
    mask = keys.argsort(dim=1).argsort(dim=1) < num_masked
    noise = masking.mask_to_noise(mask, expected_num_masked=num_masked)
    kept = noise.argsort(dim=1)[:, : num_patches - num_masked]  # what HF MAE keeps
    assert not mask.gather(1, kept).any()
    assert (kept.diff(dim=1) > 0).all()  # in their original order


# ---------------------------------------------------------------------------------------------------------------
# Evolved hierarchical masking: trees, cuts, masks, depths
# ---------------------------------------------------------------------------------------------------------------


@st.composite
def similarities(draw, max_patches: int = 12) -> torch.Tensor:
    """[B, N, N] float32: random, integer-valued (many ties) or constant, not necessarily symmetric."""
    batch = draw(st.integers(1, 3))
    # Hypothesis favours small values; most cases should have enough patches for the tree to be interesting.
    n = draw(st.integers(max_patches // 2, max_patches) | st.integers(1, max_patches))
    kind = draw(st.sampled_from(["normal", "attention", "ties", "normal", "constant", "attention"]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if kind == "normal":
        return torch.randn(batch, n, n, generator=generator) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    if kind == "ties":
        return torch.randint(0, 3, (batch, n, n), generator=generator).float()
    if kind == "constant":
        return torch.full((batch, n, n), draw(st.sampled_from([-1.0, 0.0, 0.5])))
    return torch.softmax(torch.randn(batch, n, n, generator=generator), dim=-1)  # like the attention it comes from


def _leaves_under(tree: masking.MergeTree, image: int) -> list[set[int]]:
    """For every node id, the set of leaves under it."""
    n = tree.num_leaves
    leaves = [{i} for i in range(n)] + [set() for _ in range(n - 1)]
    for k, (a, b) in enumerate(tree.merges[image].tolist()):
        leaves[n + k] = leaves[a] | leaves[b]
    return leaves


def _check_tree(tree: masking.MergeTree, batch: int, n: int) -> None:
    assert tree.merges.shape == (batch, n - 1, 2) and tree.merges.dtype == torch.long
    assert tree.levels.shape == (batch, 2 * n - 1) and tree.sizes.shape == (batch, 2 * n - 1)
    assert tree.heights.shape == (batch,) and tree.num_leaves == n
    for image in range(batch):
        merges = tree.merges[image].tolist()
        levels = tree.levels[image].tolist()
        sizes = tree.sizes[image].tolist()
        children = [child for pair in merges for child in pair]
        # Every node but the root is merged exactly once; a node is created before it is merged.
        assert sorted(children) == list(range(2 * n - 2))
        for k, (a, b) in enumerate(merges):
            node = n + k
            assert a < b < node
            assert levels[node] == max(levels[a], levels[b]) + 1
            assert sizes[node] == sizes[a] + sizes[b]
        assert levels[:n] == [0] * n and sizes[:n] == [1] * n
        assert sizes[2 * n - 2] == n
        assert int(tree.heights[image]) == levels[2 * n - 2] == max(levels)
        # Each leaf appears exactly once in the whole tree (the merges cover disjoint sets).
        assert _leaves_under(tree, image)[2 * n - 2] == set(range(n))


@SETTINGS
@given(similarity=similarities())
def test_build_merge_tree_gives_valid_trees(similarity):
    batch, n = similarity.shape[:2]
    tree = masking.build_merge_tree(similarity)
    _check_tree(tree, batch, n)
    # Deterministic, ties included.
    again = masking.build_merge_tree(similarity.clone())
    assert torch.equal(tree.merges, again.merges)


@SETTINGS
@given(similarity=similarities(max_patches=10))
def test_build_merge_tree_is_greedy_average_linkage(similarity):
    """Each merge joins a pair of active clusters with the highest mean leaf-to-leaf similarity (UPGMA)."""
    batch, n = similarity.shape[:2]
    tree = masking.build_merge_tree(similarity)
    sym = ((similarity + similarity.transpose(1, 2)) / 2).double().numpy()
    scale = max(1.0, float(np.abs(sym).max()))
    for image in range(batch):
        leaves = _leaves_under(tree, image)
        active = list(range(n))
        previous = math.inf
        for k, (a, b) in enumerate(tree.merges[image].tolist()):
            assert a in active and b in active

            def linkage(x, y, image=image, leaves=leaves):
                return sym[image][np.ix_(sorted(leaves[x]), sorted(leaves[y]))].mean()

            best = max(linkage(x, y) for i, x in enumerate(active) for y in active[i + 1 :])
            chosen = linkage(a, b)
            assert chosen >= best - 1e-5 * scale, (k, chosen, best)
            # Average linkage is monotone: merge similarities never increase.
            assert chosen <= previous + 1e-5 * scale
            previous = chosen
            active = [node for node in active if node not in (a, b)] + [n + k]


@SETTINGS
@given(similarity=similarities(), data=st.data())
def test_cut_tree_partitions_the_patches_into_maximal_subtrees_at_every_depth(similarity, data):
    batch, n = similarity.shape[:2]
    tree = masking.build_merge_tree(similarity)
    parents = {}
    for image in range(batch):
        parents[image] = {child: n + k for k, pair in enumerate(tree.merges[image].tolist()) for child in pair}
    max_height = int(tree.heights.max())
    depths = list(range(max_height + 2))
    per_image = torch.tensor(data.draw(st.lists(st.integers(0, max_height + 1), min_size=batch, max_size=batch)))
    cases = [torch.full((batch,), d, dtype=torch.long) for d in depths] + [per_image]
    for depth in cases:
        labels = masking.cut_tree(tree, depth)
        assert labels.shape == (batch, n) and labels.dtype == torch.long
        for image in range(batch):
            d = int(depth[image])
            leaves = _leaves_under(tree, image)
            levels = tree.levels[image].tolist()
            row = labels[image].tolist()
            for group in set(row):
                # The patches labelled `group` are exactly the leaves under it: each patch is in one subtree.
                assert {p for p in range(n) if row[p] == group} == leaves[group]
                assert levels[group] <= d
                # Maximal: its parent (if any) is above the cut.
                parent = parents[image].get(group)
                assert parent is None or levels[parent] > d
            if d == 0:
                assert row == list(range(n))
            if d >= int(tree.heights[image]):
                assert set(row) == {2 * n - 2}


@SETTINGS
@given(similarity=similarities(), ratio=RATIOS, data=st.data())
def test_evolved_mask_exact_count_and_at_most_one_partial_group(similarity, ratio, data):
    batch, n = similarity.shape[:2]
    tree = masking.build_merge_tree(similarity)
    heights = tree.heights.tolist()
    depth = torch.tensor([data.draw(st.integers(0, h + 1)) for h in heights])
    seed = data.draw(st.integers(0, 2**31 - 1))
    mask = masking.evolved_mask(tree, depth, ratio, generator=torch.Generator().manual_seed(seed))
    _check_mask(mask, batch, n, round(ratio * n))
    labels = masking.cut_tree(tree, depth)
    for image in range(batch):
        partial = 0
        for group in labels[image].unique():
            masked = mask[image][labels[image] == group]
            partial += bool(masked.any() and not masked.all())
        assert partial <= 1  # whole subtrees, except the last one visited, which is truncated
    again = masking.evolved_mask(tree, depth, ratio, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(mask, again)


@FEW
@given(
    heights=st.lists(st.integers(0, 200), min_size=1, max_size=4),
    fractions=st.tuples(st.floats(0, 1), st.floats(0, 1)).map(sorted),
    times=st.tuples(st.floats(0, 1), st.floats(0, 1)).map(sorted),
)
def test_evolved_depth_is_within_the_tree_and_monotone_in_the_progress(heights, fractions, times):
    f0, f1 = fractions
    h = torch.tensor(heights)
    early = masking.evolved_depth(h, times[0], f0, f1)
    late = masking.evolved_depth(h, times[1], f0, f1)
    for depth in (early, late):
        assert depth.dtype == torch.long and depth.shape == h.shape
        assert (depth >= 0).all() and (depth <= h).all()
    assert (early <= late).all()


@pytest.mark.parametrize("n", [1, 2])
def test_merge_tree_and_masks_on_the_smallest_inputs(n):
    tree = masking.build_merge_tree(torch.zeros(2, n, n))
    _check_tree(tree, 2, n)
    labels = masking.cut_tree(tree, torch.tensor([0, 5]))
    assert labels[0].tolist() == list(range(n)) and labels[1].tolist() == [2 * n - 2] * n
