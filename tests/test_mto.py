"""hf_mto.mto against values worked out by hand on tiny tensors."""

import math

import pytest
import torch
from huggingface_hub.errors import StrictDataclassFieldValidationError

from hf_mto import mto
from hf_mto.methods import registered_methods


def entropy(logits):
    """Entropy of softmax(logits), written out directly from the definition."""
    z = sum(math.exp(v) for v in logits)
    return -sum(math.exp(v) / z * (v - math.log(z)) for v in logits)


def softplus(v):
    return math.log1p(math.exp(v))


# Three tokens in 2-D: x0 = [1, 0] (visible), x1 = [1, 1] (masked), x2 = [0, 0] (visible).
HIDDEN = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]])
MASK = torch.tensor([[False, True, False]])


def test_heterogeneity_by_hand():
    # masked row 1 over visible columns {0, 2}: logits x1.x0 = 1, x1.x2 = 0
    expected = entropy([1.0, 0.0])
    assert mto.heterogeneity(HIDDEN, MASK, affinity="dot").item() == pytest.approx(expected, rel=1e-6)
    # the default affinity is the cosine / 0.1: cos(x1, x0) = 1 / sqrt(2); the zero token x2 has cosine 0
    expected = entropy([10.0 / math.sqrt(2), 0.0])  # ~0.007: float32's 1 / sqrt(2), times 10, moves it by 6e-6
    assert mto.heterogeneity(HIDDEN, MASK).item() == pytest.approx(expected, rel=2e-5)
    expected = entropy([1.0 / math.sqrt(2), 0.0])  # "scaled" divides the dot products by sqrt(D) = sqrt(2)
    assert mto.heterogeneity(HIDDEN, MASK, affinity="scaled").item() == pytest.approx(expected, rel=1e-6)


def test_sparsity_loss_by_hand():
    # visible rows over all columns: row 0 logits [1, 1, 0]; row 2 logits [0, 0, 0] (uniform over 3)
    expected = (entropy([1.0, 1.0, 0.0]) + math.log(3)) / 2
    assert mto.sparsity_loss(HIDDEN, MASK, affinity="dot").item() == pytest.approx(expected, rel=1e-6)
    # the default cosine / 0.1: row 0 logits [10, 10 / sqrt(2), 0]; the zero row 2 stays uniform
    expected = (entropy([10.0, 10.0 / math.sqrt(2), 0.0]) + math.log(3)) / 2
    assert mto.sparsity_loss(HIDDEN, MASK).item() == pytest.approx(expected, rel=1e-6)
    expected = (entropy([1.0 / math.sqrt(2), 1.0 / math.sqrt(2), 0.0]) + math.log(3)) / 2  # "scaled": / sqrt(2)
    assert mto.sparsity_loss(HIDDEN, MASK, affinity="scaled").item() == pytest.approx(expected, rel=1e-6)


def test_sparsity_loss_is_mean_over_images_of_mean_over_visible_rows():
    hidden = torch.cat([HIDDEN, HIDDEN.flip(1)])
    mask = torch.cat([MASK, torch.tensor([[True, False, True]])])
    # image 2: tokens [0,0], [1,1] (visible), [1,0] -> single visible row 1, logits [0, 2, 1]
    expected = ((entropy([1.0, 1.0, 0.0]) + math.log(3)) / 2 + entropy([0.0, 2.0, 1.0])) / 2
    assert mto.sparsity_loss(hidden, mask, affinity="dot").item() == pytest.approx(expected, rel=1e-6)


def test_affinity_modes_by_hand():
    hidden = torch.tensor([[[3.0, 4.0], [4.0, 0.0]]])
    dot = mto.affinity_logits(hidden, "dot")
    assert dot[0].tolist() == [[25.0, 12.0], [12.0, 16.0]]
    scaled = mto.affinity_logits(hidden, "scaled")
    assert scaled[0, 0, 1].item() == pytest.approx(12.0 / math.sqrt(2))
    cosine = mto.affinity_logits(hidden, "cosine", temperature=0.5)
    assert cosine[0, 0, 1].item() == pytest.approx((12.0 / (5.0 * 4.0)) / 0.5)
    assert cosine[0, 1, 1].item() == pytest.approx(2.0)


def test_singularity_loss_by_hand():
    h0 = torch.tensor([0.5, 2.0])
    assert mto.singularity_loss(h0, eps=1e-6).item() == pytest.approx((1 / 0.500001 + 1 / 2.000001) / 2)
    # an undefined image (no masked or no visible token, H^0 = 0) is left out instead of contributing 1/eps
    loss = mto.singularity_loss(torch.tensor([0.5, 0.0]), valid=torch.tensor([True, False]))
    assert loss.item() == pytest.approx(1 / 0.500001)


def test_ranking_loss_by_hand_both_directions():
    hs = torch.tensor([[3.0], [2.0], [2.5]])  # H^0, H^1, H^2 of one image
    intended = softplus(2.0 - 3.0) + softplus(2.5 - 2.0)
    literal = softplus(3.0 - 2.0) + softplus(2.0 - 2.5)
    assert mto.ranking_loss(hs).item() == pytest.approx(intended, rel=1e-6)
    assert mto.ranking_loss(hs, mode="literal").item() == pytest.approx(literal, rel=1e-6)


def test_intended_ranking_gradient_pushes_deeper_layers_below_shallower():
    hs = torch.tensor([[1.0], [1.0], [1.0]], requires_grad=True)
    mto.ranking_loss(hs).backward()
    grad = hs.grad[:, 0]
    # gradient descent moves H along -grad: H^0 up, H^L down, so H^l < H^{l-1} is rewarded
    assert grad[0] < 0
    assert grad[2] > 0
    # the printed Eq. 7 does the opposite
    hs.grad = None
    mto.ranking_loss(hs, mode="literal").backward()
    assert hs.grad[0, 0] > 0 and hs.grad[2, 0] < 0
    # and a few descent steps on the intended loss do order the layers
    hs = torch.tensor([[1.0], [1.0], [1.0]], requires_grad=True)
    optimizer = torch.optim.SGD([hs], lr=0.5)
    for _ in range(20):
        optimizer.zero_grad()
        mto.ranking_loss(hs).backward()
        optimizer.step()
    assert hs[0, 0] > hs[1, 0] > hs[2, 0]


@pytest.mark.parametrize("affinity", mto.AFFINITY_MODES)
def test_rows_without_masked_or_visible_tokens_are_finite_and_left_out(affinity):
    torch.manual_seed(0)
    hidden = torch.randn(4, 6, 5, requires_grad=True)
    mask = torch.tensor(
        [
            [True] * 6,  # nothing visible
            [False] * 6,  # nothing masked
            [True, False, True, False, True, False],
            [True, True, False, False, False, False],
        ]
    )
    het = mto.heterogeneity(hidden, mask, affinity=affinity)
    assert het[0] == 0 and het[1] == 0
    terms = mto.mto_terms([hidden, hidden * 2], mask, affinity=affinity)
    total = terms.sparsity_loss + terms.singularity_loss + terms.ranking_loss + terms.heterogeneity.sum()
    total.backward()
    assert torch.isfinite(total)
    assert torch.isfinite(hidden.grad).all()
    # per image: 0 for the two undefined images, the valid images' own values for the others
    alone = mto.mto_terms([hidden[2:], hidden[2:] * 2], mask[2:], affinity=affinity)
    assert terms.heterogeneity.shape == (4, 2)
    assert (terms.heterogeneity[:2] == 0).all()
    assert torch.allclose(terms.heterogeneity[2:], alone.heterogeneity)
    # the batch means (the losses, and the logged mean heterogeneity) equal the means over the two valid images
    assert torch.allclose(mto.mean_heterogeneity(terms.heterogeneity, mask), alone.heterogeneity.mean(dim=0))
    assert torch.allclose(terms.singularity_loss, alone.singularity_loss)
    assert torch.allclose(terms.ranking_loss, alone.ranking_loss)


def test_all_masked_batch_gives_zero_terms_not_nan():
    hidden = torch.randn(2, 4, 3, requires_grad=True)
    mask = torch.ones(2, 4, dtype=torch.bool)
    terms = mto.mto_terms([hidden, hidden], mask)
    assert terms.sparsity_loss == 0 and terms.singularity_loss == 0 and terms.ranking_loss == 0
    (terms.sparsity_loss + terms.singularity_loss + terms.ranking_loss).backward()
    assert torch.isfinite(hidden.grad).all()


def test_mto_terms_matches_the_separate_functions():
    torch.manual_seed(1)
    states = [torch.randn(3, 8, 4) for _ in range(3)]
    mask = torch.rand(3, 8) < 0.5
    mask[:, 0], mask[:, 1] = True, False
    terms = mto.mto_terms(states, mask, spa_layers=[0, 2], eps=1e-3, ranking="literal")
    hs = torch.stack([mto.heterogeneity(s, mask) for s in states])  # [L+1, B]
    assert terms.heterogeneity.shape == (3, 3) and torch.allclose(terms.heterogeneity, hs.T)
    expected_spa = (mto.sparsity_loss(states[0], mask) + mto.sparsity_loss(states[2], mask)) / 2
    assert torch.allclose(terms.sparsity_loss, expected_spa)
    assert torch.allclose(terms.singularity_loss, mto.singularity_loss(hs[0], eps=1e-3))
    assert torch.allclose(terms.ranking_loss, mto.ranking_loss(hs, mode="literal"))


def test_bf16_autocast_input_is_computed_in_float32_and_finite():
    torch.manual_seed(2)
    hidden = torch.randn(2, 16, 8)
    mask = torch.rand(2, 16) < 0.75
    mask[:, 0], mask[:, 1] = True, False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_hidden = torch.nn.functional.linear(hidden, torch.eye(8))  # bf16 under autocast
        assert bf16_hidden.dtype == torch.bfloat16
        terms = mto.mto_terms([bf16_hidden, bf16_hidden], mask)
    assert terms.heterogeneity.dtype == torch.float32
    assert all(torch.isfinite(t).all() for t in (terms.heterogeneity, terms.sparsity_loss, terms.ranking_loss))
    reference = mto.mto_terms([bf16_hidden.float(), bf16_hidden.float()], mask)
    assert torch.allclose(terms.heterogeneity, reference.heterogeneity)


def test_extreme_magnitudes_give_finite_losses_and_gradients():
    torch.manual_seed(3)
    hidden = (torch.randn(2, 10, 6) * 1e4).requires_grad_()
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[:, :7] = True
    terms = mto.mto_terms([hidden, hidden * 0.5], mask)
    total = terms.sparsity_loss + terms.singularity_loss + terms.ranking_loss
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(hidden.grad).all()


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="'euclid'"):
        mto.heterogeneity(HIDDEN, MASK, affinity="euclid")
    with pytest.raises(ValueError, match="float32"):
        mto.heterogeneity(HIDDEN, MASK.float())
    with pytest.raises(ValueError, match=r"\[1, 4\]"):
        mto.heterogeneity(HIDDEN, torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="'sideways'"):
        mto.ranking_loss(torch.zeros(3, 2), mode="sideways")
    with pytest.raises(ValueError, match="-1"):
        mto.singularity_loss(torch.ones(2), eps=-1)
    with pytest.raises(ValueError, match=r"\[5\]"):
        mto.mto_terms([HIDDEN, HIDDEN], MASK, spa_layers=[5])
    with pytest.raises(ValueError, match="0.0"):
        mto.affinity_logits(HIDDEN, "cosine", temperature=0.0)
    with pytest.raises(ValueError, match=r"num_visible must be in \(0, 3\), got 3"):
        mto.mto_terms_visible_first([HIDDEN, HIDDEN], num_visible=3)


@pytest.mark.parametrize("num_prefix_tokens", [0, 1])
@pytest.mark.parametrize("affinity", mto.AFFINITY_MODES)
def test_visible_first_path_matches_general_path_values_and_gradients(affinity, num_prefix_tokens):
    torch.manual_seed(4)
    states = [torch.randn(3, 12, 8, requires_grad=True) for _ in range(3)]
    noise = torch.rand(3, 12)
    mask = noise.argsort(dim=1).argsort(dim=1) >= 3  # exactly 9 masked per row, at random places
    general = mto.mto_terms(states, mask, spa_layers=[0, 1], affinity=affinity)
    # the same states reordered visible first (as the models' blocks produce them), after any prefix (CLS) tokens
    # that must not count, then the fast path
    order = torch.argsort(mask.to(torch.uint8), dim=1, stable=True).unsqueeze(-1).expand(-1, -1, 8)
    prefix = torch.randn(3, num_prefix_tokens, 8, requires_grad=True)
    sorted_states = [torch.cat([prefix * (i + 1), torch.gather(state, 1, order)], 1) for i, state in enumerate(states)]
    fast = mto.mto_terms_visible_first(
        sorted_states, num_visible=3, spa_layers=[0, 1], affinity=affinity, num_prefix_tokens=num_prefix_tokens
    )
    for name in ("heterogeneity", "sparsity_loss", "singularity_loss", "ranking_loss"):
        assert torch.allclose(getattr(general, name), getattr(fast, name), rtol=1e-5, atol=1e-6), name
    grads = []
    for terms in (general, fast):
        total = terms.sparsity_loss + terms.singularity_loss + terms.ranking_loss
        # the general path never sees the prefix: its gradient there is zeros, which the fast path must match
        grads.append(torch.autograd.grad(total, [*states, prefix], allow_unused=True, materialize_grads=True))
    for general_grad, fast_grad in zip(*grads, strict=True):
        assert torch.allclose(general_grad, fast_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("logit_scale", [1.0, 0.35])
@pytest.mark.parametrize("num_prefix_tokens", [0, 1])
@pytest.mark.parametrize("with_sparsity", [False, True])
def test_visible_first_entropies_hand_written_backward_passes_gradcheck(logit_scale, num_prefix_tokens, with_sparsity):
    torch.manual_seed(5)
    features = torch.randn(2, num_prefix_tokens + 7, 4, dtype=torch.float64, requires_grad=True)
    args = (logit_scale, num_prefix_tokens, 3, with_sparsity)  # 3 visible patches, 4 masked
    assert torch.autograd.gradcheck(lambda x: mto._VisibleFirstEntropies.apply(x, *args), (features,))
    outputs = mto._VisibleFirstEntropies.apply(features, *args)
    patches = features[:, num_prefix_tokens:].tolist()

    def mean_entropy(image, rows, cols):
        logits = [
            [logit_scale * sum(u * v for u, v in zip(image[r], image[c], strict=True)) for c in cols] for r in rows
        ]
        return sum(entropy(row) for row in logits) / len(rows)

    expected = [[mean_entropy(image, range(3, 7), range(3)) for image in patches]]
    if with_sparsity:
        expected.append([mean_entropy(image, range(3), range(7)) for image in patches])
    assert len(outputs) == len(expected)
    for output, values in zip(outputs, expected, strict=True):
        assert torch.allclose(output, torch.tensor(values, dtype=torch.float64))


def test_visible_first_path_under_autocast_and_extreme_magnitudes_is_float32_and_finite():
    torch.manual_seed(6)
    hidden = (torch.randn(2, 10, 6) * 1e4).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_hidden = torch.nn.functional.linear(hidden, torch.eye(6))
        terms = mto.mto_terms_visible_first([bf16_hidden, bf16_hidden * 0.5], num_visible=3, spa_layers=[0, 1])
        total = terms.sparsity_loss + terms.singularity_loss + terms.ranking_loss
    total.backward()
    assert terms.heterogeneity.dtype == torch.float32
    assert torch.isfinite(total) and torch.isfinite(hidden.grad).all()


@pytest.mark.parametrize("method", registered_methods(), ids=lambda method: method.name)
@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"use_mto": "yes"}, "use_mto"),
        ({"mto_eps": "x"}, "mto_eps"),
        ({"mto_spa_layers": "0"}, "mto_spa_layers"),
        ({"mto_temperature": None}, "mto_temperature"),
    ],
)
def test_every_methods_config_rejects_mto_fields_of_the_wrong_type_naming_the_field(method, overrides, field):
    # the MTO fields are typed once (MTOConfigMixin) and checked by each config's strict dataclass validation
    with pytest.raises(StrictDataclassFieldValidationError, match=f"field '{field}'"):
        method.config_class(**overrides)
