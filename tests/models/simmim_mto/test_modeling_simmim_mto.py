"""SimMIMMTOConfig / SimMIMMTOForMaskedImageModeling / SimMIMMTOModel (hf_mto/models/simmim_mto): transformers'
generic model tests against upstream ViTForMaskedImageModeling and ViTModel, MTO on and off (`SimMIMMTOModelTester`,
see tests/conformance.py), then upstream equality, the MTO terms on the encoder, the initialisation and loading at the
suite's tiny config (conftest.TINY_SIMMIM).
"""

import textwrap
import unittest

import pytest
import torch
from conformance import ConformanceTest, ViTModelTester
from conftest import TINY_SIMMIM, run_without_hf_mto
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedImageModeling,
    ViTConfig,
    ViTForMaskedImageModeling,
    ViTModel,
)

from hf_mto import SimMIMMTOConfig, SimMIMMTOForMaskedImageModeling, SimMIMMTOModel, mto
from hf_mto.masking import simmim_block_mask
from hf_mto.models.simmim_mto import modeling_simmim_mto


class SimMIMMTOModelTester(ViTModelTester):
    """Upstream's ViT tester shape with SimMIM's one-patch head (`encoder_stride` = `patch_size`) and a fixed
    `bool_masked_pos`."""

    seq_length = 1 + (ViTModelTester.image_size // ViTModelTester.patch_size) ** 2

    def config_kwargs(self) -> dict:
        return dict(super().config_kwargs(), encoder_stride=self.patch_size)

    def prepare_config_and_inputs_for_common(self):
        return self.get_config(), {"pixel_values": self.pixel_values(), "bool_masked_pos": self.fixed_mask()}


class SimMIMMTOEncoderTester(SimMIMMTOModelTester):
    """SimMIM's encoder alone: built without a mask token (as upstream's `ViTModel(config)`), it takes no mask."""

    def prepare_config_and_inputs_for_common(self):
        config, inputs = super().prepare_config_and_inputs_for_common()
        del inputs["bool_masked_pos"]
        return config, inputs


class UpstreamViTSimMIMTest(ConformanceTest, unittest.TestCase):
    """The reference: upstream's class under the same tests."""

    all_model_classes = (ViTForMaskedImageModeling,)
    model_tester_class = SimMIMMTOModelTester
    config_class = ViTConfig


class SimMIMMTOOnTest(ConformanceTest, unittest.TestCase):
    all_model_classes = (SimMIMMTOForMaskedImageModeling,)
    model_tester_class = SimMIMMTOModelTester
    config_class = SimMIMMTOConfig
    config_overrides = {"use_mto": True}


@pytest.mark.slow  # the generic suite again with MTO off (the On suite runs by default): in the slow set
class SimMIMMTOOffTest(ConformanceTest, unittest.TestCase):
    all_model_classes = (SimMIMMTOForMaskedImageModeling,)
    model_tester_class = SimMIMMTOModelTester
    config_class = SimMIMMTOConfig
    config_overrides = {"use_mto": False}


class UpstreamViTEncoderTest(ConformanceTest, unittest.TestCase):
    """The reference for the encoder: upstream's `ViTModel`."""

    all_model_classes = (ViTModel,)
    model_tester_class = SimMIMMTOEncoderTester
    config_class = ViTConfig


class SimMIMMTOEncoderTest(ConformanceTest, unittest.TestCase):
    """`SimMIMMTOModel`, the encoder `AutoModel` gives for a SimMIM+MTO checkpoint (it computes no MTO term)."""

    all_model_classes = (SimMIMMTOModel,)
    model_tester_class = SimMIMMTOEncoderTester
    config_class = SimMIMMTOConfig


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return SimMIMMTOForMaskedImageModeling(SimMIMMTOConfig(**{**TINY_SIMMIM, **overrides}))


def batch(seed=0, size=3):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(size, 3, 32, 32, generator=generator)
    mask = simmim_block_mask(size, 32, 4, mask_patch_size=8, mask_ratio=0.6, generator=generator)
    return pixels, mask


def test_mto_off_loss_equals_upstream_exactly():
    model = make_model().eval()
    upstream = ViTForMaskedImageModeling(ViTConfig(**TINY_SIMMIM)).eval()
    upstream.load_state_dict(model.state_dict())
    pixels, mask = batch()
    ours = model(pixels, bool_masked_pos=mask, use_mto=False)
    theirs = upstream(pixels, bool_masked_pos=mask)
    assert torch.equal(ours.loss, theirs.loss)
    assert torch.equal(ours.reconstruction, theirs.reconstruction)
    assert ours.heterogeneity is None
    # MTO on: the blocks see visible-first order, the reconstruction is upstream's up to float summation order
    with_mto = model(pixels, bool_masked_pos=mask)
    assert torch.allclose(with_mto.loss, theirs.loss, rtol=1e-6, atol=0)
    assert torch.allclose(with_mto.reconstruction, theirs.reconstruction, rtol=1e-5, atol=1e-6)


def test_visible_first_encoder_gives_upstream_gradients():
    # MTO on runs the blocks on permuted tokens; the reconstruction loss's gradient must still be upstream's, through
    # the permutation's hand-written backward, for every parameter (the mask token included).
    model = make_model()
    upstream = ViTForMaskedImageModeling(ViTConfig(**TINY_SIMMIM))
    upstream.load_state_dict(model.state_dict())
    pixels, mask = batch()
    model(pixels, bool_masked_pos=mask).loss.backward()
    upstream(pixels, bool_masked_pos=mask).loss.backward()
    theirs = dict(upstream.named_parameters())
    for name, parameter in model.named_parameters():
        assert torch.allclose(parameter.grad, theirs[name].grad, rtol=1e-4, atol=1e-7), name


def test_visible_first_order_puts_cls_then_visible_then_masked_and_inverts():
    mask = torch.tensor([[True, False, True, False], [False, False, True, True]])
    index, inverse = modeling_simmim_mto.visible_first_order(mask)
    # rows of the flattened [2, 5, D] states: CLS, visible patches in order, masked patches in order
    assert index.tolist() == [0, 2, 4, 1, 3, 5, 6, 7, 8, 9]
    assert index[inverse].tolist() == list(range(10)) and inverse[index].tolist() == list(range(10))


def test_mto_off_does_no_mto_work(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("MTO terms computed although MTO is off")

    monkeypatch.setattr(modeling_simmim_mto, "mto_terms", forbidden)
    pixels, mask = batch()
    out = make_model(use_mto=False)(pixels, bool_masked_pos=mask)
    assert out.hidden_states is None  # the encoder states were not even collected


def test_mto_terms_come_from_encoder_states_without_cls():
    model = make_model().eval()
    pixels, mask = batch(size=4)
    captured = [model.vit.embeddings(pixels, bool_masked_pos=mask)]  # H^0: mask token substituted + positions
    for layer in model.vit.layers:
        layer.register_forward_hook(lambda m, args, out: captured.append(out))
    out = model(pixels, bool_masked_pos=mask)
    assert model.config._attn_implementation == "sdpa"
    # The blocks ran on visible-first order: put their outputs back in patch order (H^0 was computed directly), then
    # the general N x N path with the mask must agree with the model's terms.
    inverse = torch.argsort(torch.argsort(mask.to(torch.uint8), dim=1, stable=True), dim=1)
    index = inverse.unsqueeze(-1).expand(-1, -1, 32)
    states = [captured[0][:, 1:]] + [torch.gather(state[:, 1:], 1, index) for state in captured[1:]]
    expected = mto.mto_terms(states, mask)
    assert out.heterogeneity.shape == (4, 3)  # per image: [batch, encoder layers + 1]
    for name in ("heterogeneity", "sparsity_loss", "singularity_loss", "ranking_loss"):
        assert torch.allclose(getattr(out, name), getattr(expected, name), rtol=1e-5), name
    # float, 1 = masked, as ViTMAEForPreTraining's mask
    assert out.mask.dtype == torch.float32 and torch.equal(out.mask, mask.float())


def test_ragged_masks_use_the_general_path_with_the_same_values():
    model = make_model().eval()
    pixels, mask = batch()
    mask[0, ~mask[0]] = torch.tensor([True] + [False] * int((~mask[0]).sum() - 1))  # one more masked in row 0
    out = model(pixels, bool_masked_pos=mask)
    states = model(pixels, bool_masked_pos=mask, output_hidden_states=True, use_mto=False).hidden_states
    expected = mto.mto_terms([s[:, 1:] for s in states], mask)
    assert torch.allclose(out.ranking_loss, expected.ranking_loss, rtol=1e-5)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_requested_states_and_attentions_are_upstreams_and_mto_terms_the_same(attn_implementation):
    # Asking for them makes the forward take the mask-based path: what it returns is upstream's (patch order,
    # pre-layernorm last state, per-head attention maps) and its MTO terms are the visible-first path's.
    model = make_model(attn_implementation=attn_implementation).eval()
    upstream = ViTForMaskedImageModeling(ViTConfig(**TINY_SIMMIM, attn_implementation=attn_implementation)).eval()
    upstream.load_state_dict(model.state_dict())
    pixels, mask = batch(size=4)
    flags = dict(output_hidden_states=True, output_attentions=attn_implementation == "eager")
    with torch.no_grad():
        fast = model(pixels, bool_masked_pos=mask)
        ours = model(pixels, bool_masked_pos=mask, **flags)
        theirs = upstream(pixels, bool_masked_pos=mask, **flags)
    assert fast.hidden_states is None and fast.attentions is None  # nothing asked, nothing returned
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 3
    for state, expected in zip(ours.hidden_states, theirs.hidden_states, strict=True):
        torch.testing.assert_close(state, expected)
    if flags["output_attentions"]:
        assert len(ours.attentions) == 2 and ours.attentions[0].shape == (4, 4, 65, 65)
        for attention, expected in zip(ours.attentions, theirs.attentions, strict=True):
            torch.testing.assert_close(attention, expected)
    for name in ("heterogeneity", "sparsity_loss", "singularity_loss", "ranking_loss"):
        torch.testing.assert_close(getattr(ours, name), getattr(fast, name), msg=name)


def test_a_token_padding_mask_is_applied_in_patch_order():
    # the visible-first encoder would put the tokens, not the padding mask, in another order: it is not used then
    model = make_model().eval()
    upstream = ViTForMaskedImageModeling(ViTConfig(**TINY_SIMMIM)).eval()
    upstream.load_state_dict(model.state_dict())
    pixels, mask = batch()
    attention_mask = torch.ones(3, 65, dtype=torch.long)
    attention_mask[:, 1:9] = 0  # the first patch row attends nowhere
    with torch.no_grad():
        ours = model(pixels, bool_masked_pos=mask, attention_mask=attention_mask)
        theirs = upstream(pixels, bool_masked_pos=mask, attention_mask=attention_mask)
    torch.testing.assert_close(ours.reconstruction, theirs.reconstruction)
    assert ours.ranking_loss is not None


def test_hidden_states_selected_by_index_as_upstream_selects_them():
    model = make_model().eval()
    upstream = ViTForMaskedImageModeling(ViTConfig(**TINY_SIMMIM)).eval()
    upstream.load_state_dict(model.state_dict())
    pixels, mask = batch()
    with torch.no_grad():
        ours = model(pixels, bool_masked_pos=mask, output_hidden_states=[0, -1])
        theirs = upstream(pixels, bool_masked_pos=mask, output_hidden_states=[0, -1])
    assert [state is None for state in ours.hidden_states] == [state is None for state in theirs.hidden_states]
    assert ours.hidden_states[1] is None
    torch.testing.assert_close(ours.hidden_states[-1], theirs.hidden_states[-1])
    assert ours.ranking_loss is not None  # the MTO terms still saw every state


def test_heterogeneity_is_per_image_so_a_batch_gives_what_its_images_give_alone():
    # raw dot products: at this width and initialisation the scaled affinity is near uniform in every image
    model = make_model(mto_affinity="dot").eval()
    pixels, mask = batch(size=4)
    with torch.no_grad():
        batched = model(pixels, bool_masked_pos=mask).heterogeneity
        alone = torch.cat([model(pixels[i : i + 1], bool_masked_pos=mask[i : i + 1]).heterogeneity for i in range(4)])
    assert batched.shape == (4, 3)
    torch.testing.assert_close(batched, alone)
    assert not torch.allclose(batched[0], batched[1])


def test_heterogeneity_is_zero_for_an_image_with_nothing_masked():
    model = make_model().eval()
    pixels, mask = batch(size=2)
    mask[1] = False
    out = model(pixels, bool_masked_pos=mask)
    assert (out.heterogeneity[1] == 0).all() and (out.heterogeneity[0] > 0).all()
    # the losses average over the images where the terms are defined: image 0 alone
    alone = model(pixels[:1], bool_masked_pos=mask[:1])
    torch.testing.assert_close(out.singularity_loss, alone.singularity_loss)
    torch.testing.assert_close(mto.mean_heterogeneity(out.heterogeneity, out.mask), alone.heterogeneity[0])


def test_mto_terms_reach_the_mask_token():
    model = make_model()
    pixels, mask = batch()
    out = model(pixels, bool_masked_pos=mask)
    (out.sparsity_loss + out.singularity_loss + out.ranking_loss).backward()
    assert model.vit.embeddings.mask_token.grad.abs().sum() > 0


def test_mask_token_initialised_like_official_simmim():
    token = make_model(hidden_size=256, num_attention_heads=4).vit.embeddings.mask_token
    # official SimMIM: timm's trunc_normal_(std=0.02), whose bounds are +-2 absolute, i.e. effectively N(0, 0.02)
    assert 0.015 < token.std().item() < 0.025
    assert abs(token.mean().item()) < 0.006
    upstream = ViTForMaskedImageModeling(ViTConfig(**TINY_SIMMIM))
    assert upstream.vit.embeddings.mask_token.abs().sum() == 0  # upstream: zeros


def test_round_trip_and_auto_class(tmp_path):
    model = make_model().eval()
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), SimMIMMTOConfig)
    loaded = AutoModelForMaskedImageModeling.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, SimMIMMTOForMaskedImageModeling)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_auto_model_gives_the_encoder_and_saves_its_auto_map(tmp_path):
    encoder = AutoModel.from_config(SimMIMMTOConfig(**TINY_SIMMIM))
    assert type(encoder) is SimMIMMTOModel
    encoder.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).auto_map["AutoModel"] == "modeling_simmim_mto.SimMIMMTOModel"
    assert type(AutoModel.from_pretrained(tmp_path)) is SimMIMMTOModel


@pytest.mark.slow  # a fresh Python process importing transformers (~6 s): in the slow set
def test_trust_remote_code_load_in_fresh_process_without_hf_mto(tmp_path):
    model = make_model().eval()
    model.save_pretrained(tmp_path / "ckpt")
    pixels, mask = batch()
    expected = model(pixels, bool_masked_pos=mask)
    torch.save({"pixels": pixels, "mask": mask}, tmp_path / "inputs.pt")
    script = textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForMaskedImageModeling
        model = AutoModelForMaskedImageModeling.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True)
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        out = model.eval()(inputs["pixels"], bool_masked_pos=inputs["mask"])
        print(type(model).__module__, out.loss.item(), out.ranking_loss.item())
        """
    )
    module, loss, ranking = run_without_hf_mto(script, tmp_path).split()
    assert module.startswith("transformers_modules")
    assert float(loss) == pytest.approx(expected.loss.item(), rel=1e-6)
    assert float(ranking) == pytest.approx(expected.ranking_loss.item(), rel=1e-6)


@pytest.mark.parametrize(
    "mask, message",
    [
        (torch.zeros(3, 63, dtype=torch.bool), r"\[3, 64\].*\[3, 63\]"),
        (torch.zeros(64, dtype=torch.bool), r"\[64\]"),
        (torch.zeros(3, 64), "float32"),
    ],
)
def test_wrong_masks_are_rejected(mask, message):
    pixels, _ = batch()
    with pytest.raises(ValueError, match=message):
        make_model()(pixels, bool_masked_pos=mask)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"mask_ratio": 1.0}, "1.0"),
        ({"image_size": 30}, "30"),
        ({"encoder_stride": 8}, "encoder_stride"),
        ({"mto_affinity": "l2"}, "'l2'"),
        ({"mto_spa_layers": [3]}, r"\[3\]"),
        ({"mto_eps": 0.0}, "mto_eps"),
    ],
)
def test_bad_config_values_raise_value_error_naming_the_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        SimMIMMTOConfig(**{**TINY_SIMMIM, **overrides})


def test_image_processor_is_registered_for_both_model_types():
    from transformers import ViTImageProcessor
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING

    from hf_mto import ViTMAEMTOConfig

    for config_class in (SimMIMMTOConfig, ViTMAEMTOConfig):
        assert ViTImageProcessor in IMAGE_PROCESSOR_MAPPING[config_class].values()
