"""ViTMAEMTOConfig / ViTMAEMTOForPreTraining / ViTMAEMTOModel (hf_mto/models/vit_mae_mto): transformers' generic model
tests against upstream ViTMAE, MTO on and off (`ViTMAEMTOModelTester`, see tests/conformance.py), then upstream
equality, the MTO terms, the initialisation, loading and validation at the suite's tiny config (conftest.TINY_MAE).
"""

import math
import textwrap
import unittest

import pytest
import torch
from conformance import ConformanceTest, NoiseMaskedModelTester
from conftest import TINY_MAE, run_without_hf_mto
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForPreTraining,
    ViTMAEConfig,
    ViTMAEForPreTraining,
    ViTMAEModel,
)

import hf_mto
from hf_mto import ViTMAEMTOConfig, ViTMAEMTOForPreTraining, ViTMAEMTOModel, mto
from hf_mto.models.vit_mae_mto import modeling_vit_mae_mto


class ViTMAEMTOModelTester(NoiseMaskedModelTester):
    """Upstream's ViTMAE tester shape, with a fixed noise (see `NoiseMaskedModelTester`)."""


class UpstreamViTMAETest(ConformanceTest, unittest.TestCase):
    """The reference: upstream's classes under the same tests."""

    all_model_classes = (ViTMAEModel, ViTMAEForPreTraining)
    model_tester_class = ViTMAEMTOModelTester
    config_class = ViTMAEConfig


class ViTMAEMTOOnTest(ConformanceTest, unittest.TestCase):
    all_model_classes = (ViTMAEMTOModel, ViTMAEMTOForPreTraining)
    model_tester_class = ViTMAEMTOModelTester
    config_class = ViTMAEMTOConfig
    config_overrides = {"use_mto": True}


@pytest.mark.slow  # the generic suite again with MTO off (the On suite runs by default): in the slow set
class ViTMAEMTOOffTest(ConformanceTest, unittest.TestCase):
    all_model_classes = (ViTMAEMTOModel, ViTMAEMTOForPreTraining)
    model_tester_class = ViTMAEMTOModelTester
    config_class = ViTMAEMTOConfig
    config_overrides = {"use_mto": False}


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return ViTMAEMTOForPreTraining(ViTMAEMTOConfig(**{**TINY_MAE, **overrides}))


def batch(seed=0, size=3):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 3, 32, 32, generator=generator), torch.rand(size, 64, generator=generator)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_mto_off_loss_equals_upstream_exactly(tiny_mae_kwargs, norm_pix_loss):
    model = make_model(norm_pix_loss=norm_pix_loss).eval()
    upstream = ViTMAEForPreTraining(ViTMAEConfig(**tiny_mae_kwargs, norm_pix_loss=norm_pix_loss)).eval()
    upstream.load_state_dict(model.state_dict())
    pixels, noise = batch()
    ours = model(pixels, noise=noise, use_mto=False)
    theirs = upstream(pixels, noise=noise)
    assert torch.equal(ours.loss, theirs.loss)
    assert torch.equal(ours.logits, theirs.logits)
    assert torch.equal(ours.mask, theirs.mask)
    assert ours.heterogeneity is None and ours.sparsity_loss is None
    # with MTO on the reconstruction loss is still upstream's (the decoder only runs its tokens in another order)
    with_mto = model(pixels, noise=noise, use_mto=True)
    assert torch.allclose(with_mto.loss, theirs.loss, rtol=1e-6, atol=0)
    assert torch.allclose(with_mto.logits, theirs.logits, rtol=1e-5, atol=1e-6)


def test_mto_off_does_no_mto_work(monkeypatch):
    model = make_model(use_mto=False)

    def forbidden(*args, **kwargs):
        raise AssertionError("MTO terms computed although MTO is off")

    monkeypatch.setattr(modeling_vit_mae_mto, "mto_terms_visible_first", forbidden)
    pixels, noise = batch()
    model(pixels, noise=noise)
    with pytest.raises(AssertionError, match="MTO terms computed"):
        model(pixels, noise=noise, use_mto=True)


def test_mto_terms_come_from_decoder_states_without_cls():
    model = make_model().eval()
    pixels, noise = batch(size=4)
    captured = []
    # H^0 = input of the first decoder block, H^l = output of block l (captured independently with hooks)
    model.decoder.decoder_layers[0].register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    for layer in model.decoder.decoder_layers:
        layer.register_forward_hook(lambda m, args, out: captured.append(out))
    out = model(pixels, noise=noise)
    assert model.config._attn_implementation == "sdpa"  # capturing states did not force eager attention
    # With MTO on the blocks see MAE's shuffled order; back in patch order, the general N x N path must agree.
    index = out.ids_restore.unsqueeze(-1).expand(-1, -1, 32)
    states = [torch.gather(state[:, 1:], 1, index) for state in captured]
    mask = out.mask.bool()
    expected = mto.mto_terms(states, mask)
    assert out.heterogeneity.shape == (4, 3)  # per image: [batch, decoder layers + 1]
    assert torch.allclose(out.heterogeneity, expected.heterogeneity)
    assert torch.allclose(out.sparsity_loss, expected.sparsity_loss)
    assert torch.allclose(out.singularity_loss, expected.singularity_loss)
    assert torch.allclose(out.ranking_loss, expected.ranking_loss)
    # 48 masked, 16 visible: heterogeneity is an entropy over 16 visible tokens
    assert (out.heterogeneity > 0).all() and (out.heterogeneity <= math.log(16) + 1e-5).all()


def test_heterogeneity_is_per_image_so_a_batch_gives_what_its_images_give_alone():
    model = make_model().eval()
    pixels, noise = batch(size=4)
    with torch.no_grad():
        batched = model(pixels, noise=noise).heterogeneity
        alone = torch.cat([model(pixels[i : i + 1], noise=noise[i : i + 1]).heterogeneity for i in range(4)])
    assert batched.shape == (4, 3)
    torch.testing.assert_close(batched, alone)
    assert not torch.allclose(batched[0], batched[1])  # really one row per image, not a broadcast batch mean


def test_mto_terms_have_gradients_to_the_mask_token_and_encoder():
    model = make_model()
    pixels, noise = batch()
    out = model(pixels, noise=noise)
    (out.sparsity_loss + out.singularity_loss + out.ranking_loss).backward()
    assert model.decoder.mask_token.grad.abs().sum() > 0
    assert model.vit.layers[0].attention.q_proj.weight.grad.abs().sum() > 0


def test_initialisation_from_config_is_official_mae(tiny_mae_kwargs):
    model = make_model()
    grid, dim = 8, 32
    table = modeling_vit_mae_mto._mae_sincos_position_embedding(grid * grid, dim)
    for pos in (model.vit.embeddings.position_embeddings, model.decoder.decoder_pos_embed):
        assert torch.equal(pos, table)
        assert not pos.requires_grad  # fixed, as in the official MAE
    assert pos.abs().sum() > 0 and torch.equal(pos[0, 0], torch.zeros(dim))  # zero row for CLS only
    for token in (model.vit.embeddings.cls_token, model.decoder.mask_token):
        assert token.abs().sum() > 0 and token.std().item() < 0.06
    weight = model.vit.embeddings.patch_embeddings.projection.weight
    fan_in, fan_out = weight[0].numel(), weight.shape[0]
    bound = math.sqrt(6 / (fan_in + fan_out))  # Xavier-uniform as a linear layer
    assert weight.abs().max() <= bound
    assert weight.abs().max() > 0.9 * bound
    # the upstream model built the same way has nothing of this (the trap DESIGN.md describes)
    upstream = ViTMAEForPreTraining(ViTMAEConfig(**tiny_mae_kwargs))
    assert upstream.vit.embeddings.position_embeddings.abs().sum() == 0


def test_save_and_load_round_trip_keeps_every_weight(tmp_path):
    model = make_model().eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "mto.py").is_file() and (tmp_path / "modeling_vit_mae_mto.py").is_file()
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, ViTMAEMTOConfig)
    assert config.auto_map["AutoModelForPreTraining"] == "modeling_vit_mae_mto.ViTMAEMTOForPreTraining"
    loaded = AutoModelForPreTraining.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, ViTMAEMTOForPreTraining)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    pixels, noise = batch()
    assert torch.equal(model(pixels, noise=noise).ranking_loss, loaded(pixels, noise=noise).ranking_loss)


def test_the_sin_cos_tables_stay_frozen_after_loading(tmp_path):
    # transformers 5's from_pretrained makes every loaded weight trainable; MAE's tables are fixed
    make_model().save_pretrained(tmp_path)
    for loaded in (ViTMAEMTOForPreTraining.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path)):
        vit = loaded.vit if isinstance(loaded, ViTMAEMTOForPreTraining) else loaded
        assert not vit.embeddings.position_embeddings.requires_grad
        assert vit.embeddings.cls_token.requires_grad  # only the tables
    model = ViTMAEMTOForPreTraining.from_pretrained(tmp_path)
    assert not model.decoder.decoder_pos_embed.requires_grad and model.decoder.mask_token.requires_grad


@pytest.mark.slow  # a fresh Python process importing transformers (~6 s): in the slow set
def test_trust_remote_code_load_in_fresh_process_without_hf_mto(tmp_path):
    model = make_model().eval()
    model.save_pretrained(tmp_path / "ckpt")
    pixels, noise = batch()
    expected = model(pixels, noise=noise)
    torch.save({"pixels": pixels, "noise": noise}, tmp_path / "inputs.pt")
    script = textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForPreTraining
        model = AutoModelForPreTraining.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True).eval()
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        out = model(inputs["pixels"], noise=inputs["noise"])
        print(type(model).__module__, out.loss.item(), out.singularity_loss.item())
        """
    )
    module, loss, singularity = run_without_hf_mto(script, tmp_path).split()
    assert module.startswith("transformers_modules")
    assert float(loss) == pytest.approx(expected.loss.item(), rel=1e-6)
    assert float(singularity) == pytest.approx(expected.singularity_loss.item(), rel=1e-6)


def test_noise_of_wrong_shape_is_rejected():
    model = make_model()
    pixels, _ = batch()
    with pytest.raises(ValueError, match=r"\[3, 64\].*\[3, 63\]"):
        model(pixels, noise=torch.rand(3, 63))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"mask_ratio": 1.5}, "1.5"),
        ({"mask_ratio": 0.0}, "mask_ratio"),
        ({"image_size": 30}, "30"),
        ({"mto_affinity": "euclid"}, "'euclid'"),
        ({"mto_ranking": "upward"}, "'upward'"),
        ({"mto_eps": -1.0}, "-1.0"),
        ({"mto_temperature": 0.0}, "mto_temperature"),
        ({"mto_spa_layers": [0, 7]}, r"\[7\]"),
        ({"decoder_hidden_size": 30}, "30"),
    ],
)
def test_bad_config_values_raise_value_error_naming_the_value(tiny_mae_kwargs, overrides, message):
    with pytest.raises(ValueError, match=message):
        ViTMAEMTOConfig(**{**tiny_mae_kwargs, **overrides})


def test_import_registers_auto_classes():
    config = AutoConfig.for_model("vit_mae_mto", **{"image_size": 32, "patch_size": 4})
    assert isinstance(config, ViTMAEMTOConfig)
    assert hf_mto.ViTMAEMTOForPreTraining is ViTMAEMTOForPreTraining


def test_auto_model_gives_the_encoder_and_saves_its_auto_map(tmp_path, tiny_mae_kwargs):
    encoder = AutoModel.from_config(ViTMAEMTOConfig(**tiny_mae_kwargs))
    assert type(encoder) is hf_mto.ViTMAEMTOModel
    encoder.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).auto_map["AutoModel"] == "modeling_vit_mae_mto.ViTMAEMTOModel"
    assert type(AutoModel.from_pretrained(tmp_path)) is hf_mto.ViTMAEMTOModel
