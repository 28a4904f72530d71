"""BeitMTOConfig / BeitMTOForMaskedImageModeling / BeitMTOModel (hf_mto/models/beit_mto) and its image tokenizers:
transformers' generic model tests against upstream BeitForMaskedImageModeling and BeitModel, MTO on and off, then the
loss against a hand cross-entropy, checkpoints written by upstream's classes both ways, the tokenizers (interface,
determinism, frozen and outside the optimizer, saved beside the weights, the k-means fit, the errors) and BEiT's
masking."""

import pickle
import textwrap
import unittest

import pytest
import torch
from conformance import ConformanceTest, ViTModelTester
from conftest import run_without_hf_mto
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForPreTraining,
    BeitConfig,
    BeitForMaskedImageModeling,
    BeitModel,
)
from transformers.testing_utils import torch_device

from hf_mto import BeitMTOConfig, BeitMTOForMaskedImageModeling, BeitMTOModel
from hf_mto.evolved import EvolvedMasking, encoder_similarity
from hf_mto.masking import MaskGenerator
from hf_mto.methods import method_for
from hf_mto.models.beit_mto.method_beit_mto import BeitMTOMethod, fit_kmeans
from hf_mto.models.beit_mto.modeling_beit_mto import (
    KMEANS_FILE,
    DVAEImageTokenizer,
    KMeansImageTokenizer,
    build_image_tokenizer,
)

TINY_BEIT = dict(
    image_size=32,
    patch_size=4,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    vocab_size=64,
    tokenizer_type="kmeans",
    tokenizer_image_size=16,  # 2 x 2 pixel patches per token on the 8 x 8 grid
)
# A tiny dVAE (FlavaImageCodebook, random weights): 64 px / 8 = the 8 x 8 patch grid.
TINY_DVAE = dict(
    tokenizer_type="dvae",
    tokenizer_image_size=64,
    tokenizer_config=dict(num_groups=4, num_blocks_per_group=1, hidden_size=8, vocab_size=64),
)


class BeitMTOModelTester(ViTModelTester):
    """Upstream's BEiT pre-training shape at the suite's tiny size, with a fixed `bool_masked_pos`."""

    seq_length = 1 + (ViTModelTester.image_size // ViTModelTester.patch_size) ** 2

    def config_kwargs(self) -> dict:
        return dict(
            super().config_kwargs(), vocab_size=64, use_mask_token=True, use_shared_relative_position_bias=True
        )

    def prepare_config_and_inputs_for_common(self):
        return self.get_config(), {"pixel_values": self.pixel_values(), "bool_masked_pos": self.fixed_mask()}


class BeitMTOEncoderTester(BeitMTOModelTester):
    def prepare_config_and_inputs_for_common(self):
        config, inputs = super().prepare_config_and_inputs_for_common()
        del inputs["bool_masked_pos"]
        return config, inputs


class UpstreamBeitFailures:
    """Two generic tests fail on upstream's own BEiT classes with the official pre-training layout (one relative
    position bias shared by all blocks); they are skipped on upstream's classes and ours alike, saying why."""

    @unittest.skip(
        "fails on upstream BeitModel: the shared position bias is computed once, outside the checkpointed blocks"
    )
    def test_training_gradient_checkpointing_use_reentrant_true(self):
        pass


class UpstreamBeitEncoderFailures(UpstreamBeitFailures):
    @unittest.skip(
        "fails on upstream BeitModel: its per-block bias renaming cannot be reversed without per-block biases"
    )
    def test_reverse_loading_mapping(self):
        pass


class MaskedImageModelingLabels(UpstreamBeitFailures):
    """Upstream's BEiT tests' labels for the training tests: one visual-token id per masked patch of the batch."""

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels and "bool_masked_pos" in inputs_dict:
            count = int(inputs_dict["bool_masked_pos"].sum())
            inputs_dict["labels"] = torch.zeros(count, dtype=torch.long, device=torch_device)
        return inputs_dict


class UpstreamBeitTest(MaskedImageModelingLabels, ConformanceTest, unittest.TestCase):
    """The reference: upstream's class under the same tests."""

    all_model_classes = (BeitForMaskedImageModeling,)
    model_tester_class = BeitMTOModelTester
    config_class = BeitConfig


class BeitMTOOnTest(MaskedImageModelingLabels, ConformanceTest, unittest.TestCase):
    all_model_classes = (BeitMTOForMaskedImageModeling,)
    model_tester_class = BeitMTOModelTester
    config_class = BeitMTOConfig
    config_overrides = {"use_mto": True}


@pytest.mark.slow  # the generic suite again with MTO off (the On suite runs by default): in the slow set
class BeitMTOOffTest(MaskedImageModelingLabels, ConformanceTest, unittest.TestCase):
    all_model_classes = (BeitMTOForMaskedImageModeling,)
    model_tester_class = BeitMTOModelTester
    config_class = BeitMTOConfig
    config_overrides = {"use_mto": False}


class UpstreamBeitEncoderTest(UpstreamBeitEncoderFailures, ConformanceTest, unittest.TestCase):
    all_model_classes = (BeitModel,)
    model_tester_class = BeitMTOEncoderTester
    config_class = BeitConfig


class BeitMTOEncoderTest(UpstreamBeitEncoderFailures, ConformanceTest, unittest.TestCase):
    all_model_classes = (BeitMTOModel,)
    model_tester_class = BeitMTOEncoderTester
    config_class = BeitMTOConfig


def fitted_tokenizer(config: BeitMTOConfig, seed=0) -> KMeansImageTokenizer:
    tokenizer = build_image_tokenizer(config)
    generator = torch.Generator().manual_seed(seed)
    tokenizer.set_codebook(torch.randn(tokenizer.codebook.shape, generator=generator))
    return tokenizer


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = BeitMTOForMaskedImageModeling(BeitMTOConfig(**{**TINY_BEIT, **overrides}))
    if model.config.tokenizer_type == "kmeans":
        model.set_image_tokenizer(fitted_tokenizer(model.config, seed))
    return model


def batch(seed=0, size=3, tokenizer_size=16):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(size, 3, 32, 32, generator=generator)
    view = torch.randn(size, 3, tokenizer_size, tokenizer_size, generator=generator)
    mask = MaskGenerator("beit_block", 32, 4, 0.4)(size, generator=generator)
    return pixels, view, mask


def test_loss_is_cross_entropy_over_masked_patches_by_hand():
    model = make_model().eval()
    pixels, view, mask = batch()
    outputs = model(pixels, bool_masked_pos=mask, tokenizer_pixel_values=view)
    ids = model.image_tokenizer(view)  # [B, N]
    assert torch.equal(outputs.visual_tokens, ids)
    log_probs = torch.log_softmax(outputs.logits.double(), dim=-1)  # [B, N, V]
    picked = log_probs.gather(-1, ids[..., None])[..., 0]  # [B, N]
    expected = -(picked * mask).sum() / mask.sum()
    assert outputs.loss.double().item() == pytest.approx(expected.item(), rel=1e-5)
    # the visible patches do not count: changing their targets leaves the loss as it is
    other = model(pixels, bool_masked_pos=mask, labels=ids[mask])
    assert torch.equal(other.loss, outputs.loss)


def test_mto_off_equals_upstream_with_upstreams_labels():
    model = make_model().eval()
    config = BeitConfig(**{k: v for k, v in model.config.to_dict().items() if k in BeitConfig().to_dict()})
    upstream = BeitForMaskedImageModeling(config).eval()
    upstream.load_state_dict(model.state_dict())
    pixels, view, mask = batch()
    labels = model.tokenize(view)[mask]
    theirs = upstream(pixels, bool_masked_pos=mask, labels=labels)
    ours = model(pixels, bool_masked_pos=mask, tokenizer_pixel_values=view, use_mto=False)
    assert torch.equal(ours.loss, theirs.loss)
    assert torch.equal(ours.logits, theirs.logits)
    with_mto = model(pixels, bool_masked_pos=mask, tokenizer_pixel_values=view)
    assert torch.equal(with_mto.loss, theirs.loss)
    assert torch.isfinite(with_mto.sparsity_loss) and with_mto.heterogeneity.shape == (3, 3)


def test_mto_terms_reach_the_mask_token():
    model = make_model()
    pixels, view, mask = batch()
    outputs = model(pixels, bool_masked_pos=mask, tokenizer_pixel_values=view)
    (outputs.ranking_loss + outputs.singularity_loss).backward()
    assert model.beit.embeddings.mask_token.grad.abs().sum() > 0


def test_initialisation_is_the_official_beits():
    model = make_model(hidden_size=64, num_attention_heads=4, num_hidden_layers=2)
    embeddings = model.beit.embeddings
    for token in (embeddings.cls_token, embeddings.mask_token):  # upstream: zeros
        assert token.std().item() > 0.005 and token.abs().max() <= 0.02 + 1e-7  # N(0, 0.02) cut at +-0.02
    # block 2's output projections are scaled by 1/sqrt(4) against block 1's 1/sqrt(2)
    first, second = (layer.attention.o_proj.weight.std().item() for layer in model.beit.layers)
    assert second / first == pytest.approx(2**-0.5, rel=0.2)


# -- checkpoints --------------------------------------------------------------------------------------------------------


def upstream_config() -> BeitConfig:
    sizes = {k: v for k, v in TINY_BEIT.items() if not k.startswith("tokenizer")}
    return BeitConfig(**sizes, use_mask_token=True, use_shared_relative_position_bias=True, layer_norm_eps=1e-6)


def test_upstream_written_checkpoint_loads_into_ours_and_ours_into_upstreams(tmp_path):
    torch.manual_seed(0)
    upstream = BeitForMaskedImageModeling(upstream_config()).eval()
    upstream.save_pretrained(tmp_path / "upstream")
    ours, info = BeitMTOForMaskedImageModeling.from_pretrained(
        tmp_path / "upstream", config=BeitMTOConfig(**TINY_BEIT), output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    pixels, view, mask = batch()
    assert torch.equal(ours.eval()(pixels, bool_masked_pos=mask).logits, upstream(pixels, bool_masked_pos=mask).logits)
    # upstream's model type loads as BEiT through the method (its saved architectures name upstream's class)
    assert method_for(AutoConfig.from_pretrained(tmp_path / "upstream").to_dict()) is BeitMTOMethod

    ours.set_image_tokenizer(fitted_tokenizer(ours.config))
    ours.save_pretrained(tmp_path / "ours")
    back, info = BeitForMaskedImageModeling.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert torch.equal(back.eval()(pixels, bool_masked_pos=mask).logits, upstream(pixels, bool_masked_pos=mask).logits)


def test_legacy_4x_key_names_load(tmp_path):
    # the Hub's microsoft/beit-*-pt22k checkpoints carry transformers 4.x names
    from safetensors.torch import save_file

    torch.manual_seed(0)
    upstream = BeitForMaskedImageModeling(upstream_config())
    upstream.save_pretrained(tmp_path)
    legacy = {}
    for key, value in upstream.state_dict().items():
        key = key.replace("beit.layers.", "beit.encoder.layer.").replace(
            "beit.shared_position_bias", "beit.encoder.relative_position_bias"
        )
        for new, old in (("q_proj", "attention.query"), ("k_proj", "attention.key"), ("v_proj", "attention.value")):
            key = key.replace(f"attention.{new}", f"attention.{old}")
        key = key.replace("attention.o_proj", "attention.output.dense")
        key = key.replace("mlp.fc1", "intermediate.dense").replace("mlp.fc2", "output.dense")
        legacy[key] = value.contiguous()
    assert any("encoder.layer.0.attention.attention.query" in key for key in legacy)
    save_file(legacy, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours, info = BeitMTOForMaskedImageModeling.from_pretrained(
        tmp_path, config=BeitMTOConfig(**TINY_BEIT), output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for key, value in upstream.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


def test_round_trip_with_the_tokenizer_beside_the_weights(tmp_path):
    model = make_model().eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "image_tokenizer" / KMEANS_FILE).is_file()
    assert not any("codebook" in key or "tokenizer" in key for key in model.state_dict())
    assert isinstance(AutoConfig.from_pretrained(tmp_path), BeitMTOConfig)
    loaded = AutoModelForPreTraining.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, BeitMTOForMaskedImageModeling)
    assert torch.equal(loaded.image_tokenizer.codebook, model.image_tokenizer.codebook)
    pixels, view, mask = batch()
    assert torch.equal(
        loaded(pixels, bool_masked_pos=mask, tokenizer_pixel_values=view).loss,
        model(pixels, bool_masked_pos=mask, tokenizer_pixel_values=view).loss,
    )


@pytest.mark.parametrize("push", ["save_pretrained", "push_to_hub"])
def test_a_push_to_the_hub_uploads_the_tokenizer_with_the_weights(push, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from transformers import modeling_utils
    from transformers.utils import hub

    commits = []
    api = SimpleNamespace(
        create_repo=lambda repo_id, **kwargs: SimpleNamespace(repo_id=repo_id),
        create_commit=lambda operations, **kwargs: commits.append(sorted(op.path_in_repo for op in operations)),
    )
    monkeypatch.setattr(hub, "_hf_api", api)
    card = lambda *args, **kwargs: SimpleNamespace(save=lambda path: open(path, "w").close())  # noqa: E731
    monkeypatch.setattr(modeling_utils, "create_and_tag_model_card", card)
    monkeypatch.setattr(hub, "create_and_tag_model_card", card)
    model = make_model()
    if push == "save_pretrained":
        model.save_pretrained(tmp_path / "ckpt", push_to_hub=True, repo_id="someone/beit")
    else:
        model.push_to_hub("someone/beit")
    [uploaded] = commits
    assert f"image_tokenizer/{KMEANS_FILE}" in uploaded and "model.safetensors" in uploaded


@pytest.mark.parametrize("overrides", [{}, TINY_DVAE], ids=["kmeans", "dvae"])
def test_a_hub_checkpoint_brings_its_tokenizer_from_its_image_tokenizer_folder(overrides, tmp_path, monkeypatch):
    from hf_mto.models.beit_mto import modeling_beit_mto

    model = make_model(**overrides).eval()
    assert model.image_tokenizer is not None  # built (the dVAE's random weights), so saved beside the weights
    model.save_pretrained(tmp_path / "hub" / "someone" / "beit")  # the repo as the Hub would serve it
    requests = []

    def fake_snapshot_download(repo_id, allow_patterns=None, revision=None):
        requests.append((repo_id, allow_patterns, revision))
        return str(tmp_path / "hub" / repo_id)

    monkeypatch.setattr(modeling_beit_mto, "snapshot_download", fake_snapshot_download)
    loaded = BeitMTOForMaskedImageModeling(model.config)
    loaded.name_or_path, loaded.config._commit_hash = "someone/beit", "0" * 40  # as from_pretrained(repo id) sets
    view = torch.randn(2, 3, model.config.tokenizer_image_size, model.config.tokenizer_image_size)
    assert torch.equal(loaded.tokenize(view), model.tokenize(view))
    assert requests == [("someone/beit", ["image_tokenizer/*"], "0" * 40)]  # the folder only, at the weights' commit


def test_an_unreachable_hub_tokenizer_falls_back_to_the_configs_with_a_warning(monkeypatch, caplog):
    from huggingface_hub.errors import LocalEntryNotFoundError

    from hf_mto.models.beit_mto import modeling_beit_mto

    def offline(repo_id, **kwargs):
        raise LocalEntryNotFoundError("offline and not in the cache")

    monkeypatch.setattr(modeling_beit_mto, "snapshot_download", offline)
    model = BeitMTOForMaskedImageModeling(BeitMTOConfig(**TINY_BEIT))
    model.name_or_path = "someone/beit"
    with caplog.at_level("WARNING"):
        assert not model.image_tokenizer.fitted
    assert "someone/beit could not be fetched" in caplog.text and "offline" in caplog.text


def test_dvae_tokenizer_round_trip(tmp_path):
    model = make_model(**TINY_DVAE).eval()
    assert isinstance(model.image_tokenizer, DVAEImageTokenizer)
    pixels, view, mask = batch(tokenizer_size=64)
    ids = model.tokenize(view)
    assert ids.shape == (3, 64) and ids.min() >= 0 and ids.max() < 64
    model.save_pretrained(tmp_path)
    loaded = BeitMTOForMaskedImageModeling.from_pretrained(tmp_path)
    assert torch.equal(loaded.tokenize(view), ids)


def test_auto_model_gives_the_encoder(tmp_path):
    encoder = AutoModel.from_config(BeitMTOConfig(**TINY_BEIT))
    assert type(encoder) is BeitMTOModel
    encoder.save_pretrained(tmp_path)
    assert type(AutoModel.from_pretrained(tmp_path)) is BeitMTOModel


@pytest.mark.slow  # a fresh Python process importing transformers (~6 s): in the slow set
def test_trust_remote_code_load_in_fresh_process_without_hf_mto(tmp_path):
    model = make_model().eval()
    model.save_pretrained(tmp_path / "ckpt")
    pixels, view, mask = batch()
    expected = model(pixels, bool_masked_pos=mask, tokenizer_pixel_values=view)
    torch.save({"pixels": pixels, "view": view, "mask": mask}, tmp_path / "inputs.pt")
    script = textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForPreTraining
        model = AutoModelForPreTraining.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True)
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        out = model.eval()(inputs["pixels"], bool_masked_pos=inputs["mask"], tokenizer_pixel_values=inputs["view"])
        print(type(model).__module__, out.loss.item(), out.ranking_loss.item())
        """
    )
    module, loss, ranking = run_without_hf_mto(script, tmp_path).split()
    assert module.startswith("transformers_modules")
    assert float(loss) == pytest.approx(expected.loss.item(), rel=1e-6)
    assert float(ranking) == pytest.approx(expected.ranking_loss.item(), rel=1e-6)


# -- the tokenizers -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [{}, TINY_DVAE], ids=["kmeans", "dvae"])
def test_tokenizer_is_deterministic_frozen_and_outside_the_optimizer(overrides, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = make_model(**overrides)
    model.train()
    size = model.config.tokenizer_image_size
    view = torch.randn(2, 3, size, size)
    first = model.tokenize(view)
    assert torch.equal(model.tokenize(view.clone()), first)  # same image, same ids
    assert torch.equal(model.tokenize(view[1:]), first[1:])  # whatever else is in the batch
    tokenizer = model.image_tokenizer
    assert not tokenizer.training and all(not p.requires_grad for p in tokenizer.parameters())
    owned = {id(t) for t in (*tokenizer.parameters(), *tokenizer.buffers())}
    assert owned and not owned & {id(t) for t in (*model.parameters(), *model.buffers())}
    outputs = model(torch.randn(2, 3, 32, 32), bool_masked_pos=torch.rand(2, 64) < 0.4, tokenizer_pixel_values=view)
    outputs.loss.backward()
    assert all(t.grad is None for t in tokenizer.parameters())
    trainer = Trainer(model=model, args=TrainingArguments(tmp_path, report_to=[], use_cpu=True))
    optimised = {id(p) for group in trainer.create_optimizer().param_groups for p in group["params"]}
    assert optimised and not optimised & owned
    model.to(torch.bfloat16)  # a dtype cast leaves the tokenizer in float32: the same ids
    assert all(t.dtype == torch.float32 for t in tokenizer.state_dict().values())
    assert torch.equal(model.tokenize(view), first)
    model.to("meta")  # moving the model moves its tokenizer
    assert {t.device.type for t in tokenizer.state_dict().values()} == {"meta"}


def test_vocab_mismatch_is_an_error_naming_both_sizes():
    model = make_model()
    with pytest.raises(ValueError, match="32 codes.*vocab_size 64"):
        model.set_image_tokenizer(KMeansImageTokenizer(32, 2))
    with pytest.raises(ValueError, match="vocab_size 128"):
        BeitMTOConfig(**{**TINY_BEIT, **TINY_DVAE, "tokenizer_config": {"vocab_size": 128, "num_groups": 4}})


def test_token_grid_mismatch_is_an_error():
    model = make_model()
    with pytest.raises(ValueError, match="4 x 4 token grid.*8 x 8 patch grid"):
        model.set_image_tokenizer(KMeansImageTokenizer(64, 4))
    with pytest.raises(ValueError, match="token grid.*set tokenizer_image_size to 64"):
        BeitMTOConfig(**{**TINY_BEIT, **TINY_DVAE, "tokenizer_image_size": 112})
    with pytest.raises(ValueError, match="tokenizer_image_size 20"):
        BeitMTOConfig(**{**TINY_BEIT, "tokenizer_image_size": 20})
    with pytest.raises(ValueError, match=r"\[3, 3, 16, 16\].*\[2, 3, 8, 8\]|16, 16.*\[2, 3, 8, 8\]"):
        model.tokenize(torch.randn(2, 3, 8, 8))


def test_dvae_weights_not_found_offline_say_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = BeitMTOConfig(**{**TINY_BEIT, "tokenizer_type": "dvae", "tokenizer_image_size": 64})
    config.tokenizer_name_or_path = str(tmp_path / "nowhere")
    with pytest.raises(OSError, match="nowhere.*hf download facebook/flava-image-codebook.*tokenizer_name_or_path"):
        _ = BeitMTOForMaskedImageModeling(config).image_tokenizer


def test_unfitted_kmeans_tokenizer_says_how_it_gets_fitted():
    model = BeitMTOForMaskedImageModeling(BeitMTOConfig(**TINY_BEIT))
    with pytest.raises(ValueError, match="not fitted"):
        model.tokenize(torch.randn(1, 3, 16, 16))


def test_kmeans_fit_finds_separated_clusters():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = centres.repeat_interleave(50, dim=0) + 0.1 * torch.randn(150, 2, generator=generator)
    codebook = fit_kmeans(points, 3, iterations=10, generator=generator)
    assert torch.cdist(centres, codebook).min(dim=1).values.max() < 0.2


class _Images(torch.utils.data.Dataset):
    def __init__(self, transform, count=40):
        generator = torch.Generator().manual_seed(0)
        self.images = [
            Image.fromarray((torch.rand(28, 28, generator=generator) * 255).byte().numpy()) for _ in range(count)
        ]
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.transform(self.images[index])


def test_prepare_training_fits_the_kmeans_tokenizer_and_caches_it(tmp_path, monkeypatch):
    config = BeitMTOConfig(**{**TINY_BEIT, "vocab_size": 16})
    dataset = _Images(BeitMTOMethod.pretraining_transform(32, [0.5] * 3, [0.5] * 3, config=config))
    model = BeitMTOForMaskedImageModeling(config)
    state = torch.get_rng_state()
    reseeded = []  # the accelerators' RNGs, which fork_rng(devices=[]) would not restore
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    BeitMTOMethod.prepare_training(model, dataset, str(tmp_path), seed=0)
    assert torch.equal(torch.get_rng_state(), state) and not reseeded  # the training's own draws are untouched
    assert model.image_tokenizer.fitted and (tmp_path / "image_tokenizer" / KMEANS_FILE).is_file()
    ids = model.tokenize(dataset[0]["tokenizer_pixel_values"][None])
    assert (
        ids.shape == (1, 64)
        and len(
            set(
                model.tokenize(torch.stack([dataset[i]["tokenizer_pixel_values"] for i in range(8)]))
                .flatten()
                .tolist()
            )
        )
        > 4
    )
    again = BeitMTOForMaskedImageModeling(config)  # a resumed run: the cache, not a new fit (no image is read)
    BeitMTOMethod.prepare_training(again, _Unreadable(len(dataset)), str(tmp_path), seed=0)
    assert torch.equal(again.image_tokenizer.codebook, model.image_tokenizer.codebook)


def test_training_upstreams_model_says_to_load_it_as_ours(tmp_path):
    from hf_mto.trainer import MTOTrainer
    from hf_mto.training_args import MTOTrainingArguments

    config = upstream_config()
    config.mask_ratio = 0.4  # the trainer's masking reads it, as for the other upstream classes
    upstream = BeitForMaskedImageModeling(config)
    no_mto = dict(mto_spa_weight=0.0, mto_e_weight=0.0, mto_r_weight=0.0)  # upstream's computes no MTO term
    args = MTOTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, **no_mto)
    with pytest.raises(ValueError, match="BeitForMaskedImageModeling has no image tokenizer.*as BeitMTOForMasked"):
        MTOTrainer(model=upstream, args=args, train_dataset=_Unreadable(1))


class _Unreadable(torch.utils.data.Dataset):
    def __init__(self, count):
        self.count = count

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        raise AssertionError("the dataset was read")


@pytest.mark.parametrize(
    "change, named",
    [({"seed": 1}, "'seed': '0'"), ({"tokenizer_image_mean": [0.25] * 3}, "tokenizer_image_mean")],
    ids=["seed", "normalisation"],
)
def test_a_cache_fitted_otherwise_is_refitted_with_a_warning_naming_the_difference(change, named, tmp_path, caplog):
    config = BeitMTOConfig(**{**TINY_BEIT, "vocab_size": 16})
    dataset = _Images(BeitMTOMethod.pretraining_transform(32, [0.5] * 3, [0.5] * 3, config=config))
    first = BeitMTOForMaskedImageModeling(config)
    BeitMTOMethod.prepare_training(first, dataset, str(tmp_path), seed=0)
    config = BeitMTOConfig(**{**config.to_dict(), **{k: v for k, v in change.items() if k != "seed"}})
    dataset.transform = BeitMTOMethod.pretraining_transform(32, [0.5] * 3, [0.5] * 3, config=config)
    second = BeitMTOForMaskedImageModeling(config)
    with caplog.at_level("WARNING"):
        BeitMTOMethod.prepare_training(second, dataset, str(tmp_path), seed=change.get("seed", 0))
    assert named in caplog.text and "fitting a new one" in caplog.text
    assert not torch.equal(second.image_tokenizer.codebook, first.image_tokenizer.codebook)
    _, fit = KMeansImageTokenizer.read(tmp_path / "image_tokenizer" / KMEANS_FILE)  # the new fit replaced the cache
    assert fit == BeitMTOMethod.kmeans_fit(config, len(dataset), change.get("seed", 0))


@pytest.mark.parametrize("save_on_each_node", [False, True])
def test_the_fit_runs_first_on_the_main_process_of_the_run_or_of_each_node(save_on_each_node, tmp_path, monkeypatch):
    from hf_mto.trainer import MTOTrainer
    from hf_mto.training_args import MTOTrainingArguments

    # a shared output_dir (save_on_each_node False) is written once per run, not once per node
    calls = []
    monkeypatch.setattr(BeitMTOMethod, "prepare_training", classmethod(lambda cls, *args: calls.append("fit")))
    first = MTOTrainingArguments.main_process_first
    monkeypatch.setattr(
        MTOTrainingArguments,
        "main_process_first",
        lambda self, local=True, desc="work": calls.append(local) or first(self, local=local, desc=desc),
    )
    args = MTOTrainingArguments(
        output_dir=str(tmp_path), save_on_each_node=save_on_each_node, report_to="none", use_cpu=True
    )
    MTOTrainer(model=make_model(), args=args, train_dataset=_Images(lambda image: image, count=1))
    assert calls == [save_on_each_node, "fit"]


def test_an_interrupted_cache_write_leaves_no_cache(tmp_path, monkeypatch):
    from hf_mto.models.beit_mto import modeling_beit_mto

    def write_half_and_fail(tensors, path, metadata=None):
        with open(path, "wb") as file:
            file.write(b"half a codebook")
        raise OSError("disk full")

    monkeypatch.setattr(modeling_beit_mto, "save_file", write_half_and_fail)
    with pytest.raises(OSError, match="disk full"):
        make_model().image_tokenizer.save(tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither the cache a resumed run would take, nor the temporary file


def test_two_views_are_one_crop_at_two_sizes():
    config = BeitMTOConfig(**TINY_BEIT, tokenizer_image_mean=[0.5] * 3, tokenizer_image_std=[0.5] * 3)
    image = Image.fromarray((torch.arange(28 * 28).reshape(28, 28) % 255).byte().numpy())
    views = BeitMTOMethod.pretraining_transform(32, [0.5] * 3, [0.5] * 3, config=config)(image)
    assert views["pixel_values"].shape == (3, 32, 32) and views["tokenizer_pixel_values"].shape == (3, 16, 16)
    # same crop: the encoder's view downsampled is close to the tokenizer's
    small = torch.nn.functional.avg_pool2d(views["pixel_values"][None], 2)[0]
    assert (small - views["tokenizer_pixel_values"]).abs().mean() < 0.15
    evaluation = BeitMTOMethod.evaluation_transform(32, [0.5] * 3, [0.5] * 3, config=config)
    views = evaluation(image)
    assert views["pixel_values"].shape == (3, 32, 32) and views["tokenizer_pixel_values"].shape == (3, 16, 16)
    for transform in (evaluation, BeitMTOMethod.pretraining_transform(32, [0.5] * 3, [0.5] * 3, config=config)):
        pickle.dumps(transform)  # spawned data-loader workers get it pickled


# -- masking ------------------------------------------------------------------------------------------------------------


def test_default_masking_is_beits_75_of_196():
    config = BeitMTOConfig()
    assert BeitMTOMethod.default_masking == "beit_block"
    masks = MaskGenerator("beit_block", config.image_size, config.patch_size, config.mask_ratio)(8)
    assert masks.shape == (8, 196) and (masks.sum(dim=1) == 75).all()


@pytest.mark.parametrize("progress", [0.0, 0.5, 0.9])
def test_evolved_masks_at_beits_ratio_have_exactly_the_count(progress):
    model = make_model(image_size=56, patch_size=4, tokenizer_image_size=28).eval()  # 14 x 14 = 196 patches
    masking = EvolvedMasking(BeitMTOConfig().mask_ratio, 196, attention_layers=2)
    mask, depth, height = masking(model, torch.randn(4, 3, 56, 56), progress=progress)
    assert mask.shape == (4, 196) and (mask.sum(dim=1) == 75).all()
    random_masks = MaskGenerator("random", 56, 4, BeitMTOConfig().mask_ratio)(4)
    assert (random_masks.sum(dim=1) == 75).all()


@pytest.mark.parametrize(
    "bias",
    [
        {},
        {"use_shared_relative_position_bias": False, "use_relative_position_bias": True},
        {"use_relative_position_bias": True, "use_absolute_position_embeddings": True},
    ],
    ids=["shared", "per-block", "both+absolute"],
)
def test_evolved_similarity_uses_beits_attention_with_its_relative_position_bias(bias):
    model = make_model(attn_implementation="eager", num_hidden_layers=3, **bias).eval()
    with torch.no_grad():  # non-zero biases, positions and layer scales, so leaving any out would show
        for name, parameter in model.beit.named_parameters():
            if "relative_position_bias_table" in name or "position_embeddings" in name or "lambda_" in name:
                parameter.normal_()
    pixels = torch.randn(2, 3, 32, 32)
    maps = BeitMTOMethod.encoder_attention_maps(model, pixels, 3)
    attentions = model.beit(pixels, output_attentions=True).attentions
    for ours, theirs in zip(maps, attentions, strict=True):
        assert torch.allclose(ours[:, 0], theirs.mean(dim=1), atol=1e-5)
    similarity = encoder_similarity(model, pixels, 2)
    assert similarity.shape == (2, 64, 64) and torch.allclose(similarity, similarity.transpose(1, 2))


def test_evolved_similarity_in_training_mode_is_deterministic_and_draws_nothing():
    # the trainer draws evolved masks with the model in training mode: drop path and dropout must stay off there
    model = make_model(drop_path_rate=0.5, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    pixels = torch.randn(2, 3, 32, 32)
    expected = BeitMTOMethod.encoder_attention_maps(model.eval(), pixels, 2)
    model.train()
    state = torch.get_rng_state()
    with torch.no_grad():
        maps = BeitMTOMethod.encoder_attention_maps(model, pixels, 2)
    assert torch.equal(torch.get_rng_state(), state)
    for ours, theirs in zip(maps, expected, strict=True):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_frozen_encoder_features_are_the_exported_encoders_and_the_last_blocks(pooling, tmp_path):
    from hf_mto.evaluation import encoder_features
    from hf_mto.export import export_encoder

    model = make_model().eval()
    export_encoder(model, tmp_path / "encoder")
    exported = BeitModel.from_pretrained(tmp_path / "encoder").eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours, theirs = encoder_features(model, pixels, pooling), encoder_features(exported, pixels, pooling)
        # with use_mean_pooling the encoder has no final norm: the last block's output, as documented
        last = model.beit(pixels, output_hidden_states=True).hidden_states[-1]
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert torch.allclose(ours, last[:, 0] if pooling == "cls" else last[:, 1:].mean(dim=1), atol=1e-6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"mask_ratio": 1.0}, "1.0"),
        ({"image_size": 30}, "30"),
        ({"tokenizer_type": "vqgan"}, "'vqgan'"),
        ({"tokenizer_image_std": [1.0, 0.0, 1.0]}, "tokenizer_image_std"),
        ({"tokenizer_image_mean": [0.5]}, "tokenizer_image_mean"),
        ({"use_mask_token": False}, "use_mask_token"),
        ({"mto_spa_layers": [3]}, r"\[3\]"),
    ],
)
def test_bad_config_values_raise_value_error_naming_the_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        BeitMTOConfig(**{**TINY_BEIT, **overrides})


def test_export_to_stock_beit_classification_with_no_new_encoder_weight(tmp_path):
    from transformers import AutoModelForImageClassification, BeitForImageClassification

    from hf_mto.export import export_encoder

    model = make_model().eval()
    model.save_pretrained(tmp_path / "ckpt")
    export_encoder(tmp_path / "ckpt", tmp_path / "encoder")
    assert AutoConfig.from_pretrained(tmp_path / "encoder").model_type == "beit"
    classifier, info = AutoModelForImageClassification.from_pretrained(
        tmp_path / "encoder", num_labels=10, output_loading_info=True
    )
    assert type(classifier) is BeitForImageClassification
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"] and not info["unexpected_keys"]
    encoder = model.beit.state_dict()
    for key, value in classifier.beit.state_dict().items():
        if not key.startswith("pooler."):
            assert torch.equal(value, encoder[key]), key
    assert "embeddings.mask_token" not in classifier.beit.state_dict()
    pixels = torch.randn(2, 3, 32, 32)
    assert torch.allclose(classifier.beit.eval()(pixels).last_hidden_state, model.beit(pixels).last_hidden_state)
    assert "BeitModel" in (tmp_path / "encoder" / "README.md").read_text()


def test_export_fails_naming_a_stock_key_the_encoder_does_not_fill(tmp_path, monkeypatch):
    from hf_mto.export import export_encoder

    model = make_model().eval()
    # only the pooler (BEiT's fine-tuning head norm) may be new: a missing block weight is an error, not a fresh init
    monkeypatch.setattr(BeitMTOMethod, "export_dropped_keys", ("embeddings.mask_token", "layers.1.lambda_2"))
    with pytest.raises(ValueError, match=r"does not fill BeitModel: missing \['layers.1.lambda_2'\]"):
        export_encoder(model, tmp_path / "encoder")
    assert not (tmp_path / "encoder").exists()


def test_finetuning_builds_stock_beit_classifier_from_a_pretraining_checkpoint(tmp_path):
    from transformers import BeitForImageClassification

    from hf_mto.finetuning import FinetuneArguments, build_classification_model, layer_decay_param_groups

    model = make_model().eval()
    model.save_pretrained(tmp_path)
    args = FinetuneArguments(model_name_or_path=str(tmp_path), global_pool=True, drop_path_rate=0.1)
    classifier = build_classification_model(args, ["a", "b", "c"])
    assert type(classifier) is BeitForImageClassification and classifier.classifier.out_features == 3
    assert classifier.config.drop_path_rate == 0.1 and classifier.config.use_mean_pooling
    encoder = model.beit.state_dict()
    for key, value in classifier.beit.state_dict().items():
        if not key.startswith("pooler."):
            assert torch.equal(value, encoder[key]), key
    groups = layer_decay_param_groups(classifier, weight_decay=0.05, layer_decay=0.75)
    assert len({group["lr_scale"] for group in groups}) == model.config.num_hidden_layers + 2
    with pytest.raises(ValueError, match="--global_pool true"):
        build_classification_model(FinetuneArguments(model_name_or_path=str(tmp_path), global_pool=False), ["a"])


def test_vit_b_preset_decays_the_learning_rate_to_beits_min_lr(tmp_path):
    from pathlib import Path

    from transformers import get_scheduler

    from hf_mto.cli import ModelArguments, parse_args
    from hf_mto.data import DataArguments
    from hf_mto.evaluation import EncoderEvalArguments
    from hf_mto.training_args import MTOTrainingArguments

    preset = Path(__file__).resolve().parents[3] / "recipes" / "configs" / "vit_base_beit_mto_in1k.yaml"
    *_, args = parse_args(
        (ModelArguments, DataArguments, EncoderEvalArguments, MTOTrainingArguments),
        ["--config", str(preset), "--bf16", "false", "--output_dir", str(tmp_path)],
    )
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.5e-3)
    scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer, 10, 100, scheduler_specific_kwargs=args.lr_scheduler_kwargs
    )
    for _ in range(100):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)  # run_beit_pretraining.py's --min_lr
