"""Checkpoint compatibility with upstream (DESIGN.md "Checkpoint compatibility").

Every key format upstream loads -- the legacy 4.x names of the Hub's official checkpoints and what transformers 5's
`save_pretrained` writes -- loads into our classes with zero missing / unexpected weights and outputs equal to
upstream's; we save what upstream saves; and every loader of hf_mto stops, naming the keys, when a weight would be
newly initialised. The checkpoints are built here from upstream classes (no Hub).
"""

import json
import re

import pytest
import torch
from conftest import TINY_MAE, TINY_SIMMIM, RandomImages, run_without_hf_mto
from safetensors.torch import load_file, save_file
from transformers import (
    ViTConfig,
    ViTForMaskedImageModeling,
    ViTMAEConfig,
    ViTMAEForPreTraining,
    ViTModel,
)

from hf_mto import (
    SimMIMMTOConfig,
    SimMIMMTOForMaskedImageModeling,
    ViTMAEMTOConfig,
    ViTMAEMTOForPreTraining,
)
from hf_mto.analysis import load_checkpoint
from hf_mto.checkpoints import IncompleteCheckpointError, load_pretrained, load_weights_into
from hf_mto.cli import ModelArguments, build_config, build_model
from hf_mto.export import export_encoder
from hf_mto.finetuning import FinetuneArguments, build_classification_model
from hf_mto.methods import method_for
from hf_mto.run import check_resumable, train
from hf_mto.trainer import MTOTrainer
from hf_mto.training_args import MTOTrainingArguments

# transformers 4.x module names (the Hub's `facebook/vit-mae-*` and every 4.x `save_pretrained`), written out by hand
# rather than taken from transformers' own mapping, so the test does not check the mapping against itself.
_V4_NAMES = [
    (r"^vit\.layers\.", "vit.encoder.layer."),
    (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."),
    (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
]


def v4_key(key: str) -> str:
    for pattern, replacement in _V4_NAMES:
        key = re.sub(pattern, replacement, key)
    return key


def upstream_mae():
    torch.manual_seed(0)
    return ViTMAEForPreTraining(ViTMAEConfig(**TINY_MAE)).eval()


def upstream_simmim():
    torch.manual_seed(0)
    model = ViTForMaskedImageModeling(ViTConfig(**TINY_SIMMIM)).eval()
    with torch.no_grad():  # upstream leaves the mask token zero; a non-zero one shows it was loaded
        model.vit.embeddings.mask_token.normal_()
    return model


def save_v5(model, path):
    """What upstream transformers 5 `save_pretrained` writes."""
    model.save_pretrained(path)
    return path


def save_v4(model, path):
    """A checkpoint with transformers 4.x key names, as on the Hub (`facebook/vit-mae-base`)."""
    path.mkdir(parents=True)
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]  # as every saved config (the Hub's official ones too) has
    (path / "config.json").write_text(json.dumps(config))
    state = {v4_key(key): value.contiguous() for key, value in model.state_dict().items()}
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return path


CASES = {
    "mae": (upstream_mae, ViTMAEMTOConfig, ViTMAEMTOForPreTraining, "noise"),
    "simmim": (upstream_simmim, SimMIMMTOConfig, SimMIMMTOForMaskedImageModeling, "bool_masked_pos"),
}


def mask_input(kind: str, batch: int = 2):
    generator = torch.Generator().manual_seed(1)
    if kind == "noise":
        return torch.rand(batch, 64, generator=generator)
    mask = torch.zeros(batch, 64, dtype=torch.bool)
    mask[:, torch.randperm(64, generator=generator)[:38]] = True
    return mask


@pytest.mark.parametrize("method", sorted(CASES))
@pytest.mark.parametrize("save", [save_v4, save_v5], ids=["v4-names", "v5-save_pretrained"])
def test_upstream_checkpoint_loads_whole_and_matches_upstream(method, save, tmp_path):
    upstream_factory, config_class, model_class, mask_name = CASES[method]
    upstream = upstream_factory()
    path = save(upstream, tmp_path / "ckpt")
    if save is save_v4:  # the file really holds 4.x names
        assert any(".attention.attention.query." in key for key in load_file(path / "model.safetensors"))

    config = config_class.from_pretrained(path)
    ours, info = model_class.from_pretrained(path, config=config, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    for key, value in upstream.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key

    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    inputs = {"pixel_values": pixels, mask_name: mask_input(mask_name)}
    with torch.no_grad():
        expected = upstream(**inputs)
        for use_mto in (False, True):
            got = ours.eval()(**inputs, use_mto=use_mto)
            torch.testing.assert_close(got.loss, expected.loss)


@pytest.mark.parametrize("method", sorted(CASES))
def test_we_save_what_upstream_saves(method, tmp_path):
    upstream_factory, config_class, model_class, _ = CASES[method]
    upstream = upstream_factory()
    upstream.save_pretrained(tmp_path / "upstream")
    ours = model_class(config_class(**upstream.config.to_dict()))
    ours.save_pretrained(tmp_path / "ours")
    upstream_keys = set(load_file(tmp_path / "upstream" / "model.safetensors"))
    assert set(load_file(tmp_path / "ours" / "model.safetensors")) == upstream_keys
    # and upstream reads ours whole
    _, info = type(upstream).from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"]) == (set(), set())


@pytest.mark.parametrize("method", sorted(CASES))
def test_checkpoint_we_wrote_before_the_renaming_still_loads(method, tmp_path):
    """Checkpoints hf_mto wrote before it registered the renaming hold the in-memory (5.x) names."""
    _, config_class, model_class, _ = CASES[method]
    config = config_class(**(TINY_MAE if method == "mae" else TINY_SIMMIM))
    model = model_class(config)
    (tmp_path / "old").mkdir()
    config.to_json_file(tmp_path / "old" / "config.json")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "old" / "model.safetensors")
    loaded = load_pretrained(model_class, tmp_path / "old")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_remote_code_loads_upstream_names(tmp_path):
    """`save_pretrained` now writes the legacy names: the copied model code must map them back without hf_mto."""
    model = ViTMAEMTOForPreTraining(ViTMAEMTOConfig(**TINY_MAE))
    model.save_pretrained(tmp_path / "ckpt")
    assert any(".attention.attention.query." in key for key in load_file(tmp_path / "ckpt" / "model.safetensors"))
    expected = model.decoder.decoder_layers[0].attention.q_proj.weight.sum().item()
    out = run_without_hf_mto(
        f"""
from transformers import AutoModelForPreTraining
model, info = AutoModelForPreTraining.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True,
                                                      output_loading_info=True)
print(len(info["missing_keys"]), len(info["unexpected_keys"]), model.decoder.decoder_layers[0].attention.q_proj.weight.sum().item())
""",
        tmp_path,
    )
    missing, unexpected, value = out.split()
    assert (missing, unexpected) == ("0", "0")
    assert float(value) == pytest.approx(expected, abs=1e-5)


def truncated(path, drop: str, tmp_path):
    """A copy of checkpoint ``path`` without the weights whose names contain ``drop``."""
    out = tmp_path / "truncated"
    out.mkdir()
    (out / "config.json").write_text((path / "config.json").read_text())
    state = {k: v for k, v in load_file(path / "model.safetensors").items() if drop not in k}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_load_pretrained_names_the_weights_that_would_be_new(tmp_path):
    path = save_v4(upstream_mae(), tmp_path / "ckpt")
    bad = truncated(path, "decoder.decoder_layers.1.", tmp_path)
    with pytest.raises(IncompleteCheckpointError, match=r"lacks 16 weights.*decoder\.decoder_layers\.1\.") as err:
        load_pretrained(ViTMAEMTOForPreTraining, bad)
    assert all(key.startswith("decoder.decoder_layers.1.") for key in err.value.keys)


def test_recipes_refuse_a_checkpoint_missing_encoder_weights(tmp_path):
    path = save_v5(upstream_mae(), tmp_path / "ckpt")
    bad = truncated(path, "vit.encoder.layer.0.attention", tmp_path)
    # pre-training from a checkpoint (continue / start from an official model)
    args = ModelArguments(model_type="vit_mae_mto", model_name_or_path=str(bad))
    with pytest.raises(IncompleteCheckpointError, match=r"vit\.layers\.0\.attention\.k_proj\.bias"):
        build_model(args, build_config(args))
    with pytest.raises(IncompleteCheckpointError, match="vit.layers.0.attention"):
        load_checkpoint(bad)  # analysis, visualize_masks
    with pytest.raises(IncompleteCheckpointError, match="vit.layers.0.attention"):
        export_encoder(bad, tmp_path / "exported")


def test_official_mae_continues_analyses_and_exports(tmp_path):
    """An official MAE checkpoint (4.x names) is continued with MTO, analysed and exported on its own weights."""
    upstream = upstream_mae()
    path = save_v4(upstream, tmp_path / "official")
    args = ModelArguments(model_type="vit_mae_mto", model_name_or_path=str(path))
    model = build_model(args, build_config(args))
    assert isinstance(model, ViTMAEMTOForPreTraining)
    assert torch.equal(model.vit.layers[1].mlp.fc2.weight, upstream.vit.layers[1].mlp.fc2.weight)
    analysed = load_checkpoint(path)
    assert isinstance(analysed, ViTMAEMTOForPreTraining)
    assert torch.equal(
        analysed.decoder.decoder_layers[1].attention.q_proj.weight,
        upstream.decoder.decoder_layers[1].attention.q_proj.weight,
    )
    export_encoder(path, tmp_path / "exported")
    exported = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert exported["model_type"] == "vit"


def test_load_weights_into_round_trip_and_refuses_a_partial_checkpoint(tmp_path):
    model = ViTMAEMTOForPreTraining(ViTMAEMTOConfig(**TINY_MAE))
    model.save_pretrained(tmp_path / "ckpt")
    fresh = ViTMAEMTOForPreTraining(ViTMAEMTOConfig(**TINY_MAE))
    assert not torch.equal(fresh.vit.layers[0].attention.q_proj.weight, model.vit.layers[0].attention.q_proj.weight)
    load_weights_into(fresh, tmp_path / "ckpt")
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    bad = truncated(tmp_path / "ckpt", "decoder_embed", tmp_path)
    with pytest.raises(IncompleteCheckpointError, match="decoder.decoder_embed"):
        load_weights_into(fresh, bad)


def test_trainer_resume_restores_every_weight_from_legacy_names(tmp_path):
    """The stock Trainer resume loads the raw file non-strictly and would miss every legacy-named weight."""

    def trainer(max_steps):
        torch.manual_seed(0)
        args = MTOTrainingArguments(
            output_dir=str(tmp_path / "run"),
            max_steps=max_steps,
            per_device_train_batch_size=4,
            save_steps=2,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            logging_steps=1,
            learning_rate=1e-3,
            reconstruction_images=0,
        )
        return MTOTrainer(
            model=ViTMAEMTOForPreTraining(ViTMAEMTOConfig(**TINY_MAE)), args=args, train_dataset=RandomImages()
        )

    first = trainer(2)
    first.train()
    saved = load_file(tmp_path / "run" / "checkpoint-2" / "model.safetensors")
    assert any(".attention.attention.query." in key for key in saved)
    expected = {k: v.clone() for k, v in first.model.state_dict().items()}
    resumed = trainer(2)
    resumed._load_from_checkpoint(str(tmp_path / "run" / "checkpoint-2"))
    for key, value in expected.items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    # a sharded checkpoint (large models) holds the legacy names too, and takes the same path
    first.model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert any(".attention.attention.query." in key for key in index["weight_map"])
    resumed = trainer(2)
    resumed._load_from_checkpoint(str(tmp_path / "sharded"))
    for key, value in expected.items():
        assert torch.equal(resumed.model.state_dict()[key], value), key


def test_rerun_into_another_methods_output_dir_names_it_and_how_to_start_fresh(tmp_path):
    """Without the check, resuming fails inside `from_pretrained` with a message naming neither model."""
    out = tmp_path / "run"
    ViTMAEMTOForPreTraining(ViTMAEMTOConfig(**TINY_MAE)).save_pretrained(out / "checkpoint-3")
    saved = {path.name: path.read_bytes() for path in (out / "checkpoint-3").iterdir()}
    args = MTOTrainingArguments(output_dir=str(out), max_steps=1, report_to=[], use_cpu=True, reconstruction_images=0)
    simmim = SimMIMMTOForMaskedImageModeling(SimMIMMTOConfig(**TINY_SIMMIM))
    trainer = MTOTrainer(model=simmim, args=args, train_dataset=RandomImages(4))
    with pytest.raises(ValueError) as error:
        train(trainer)
    message = str(error.value)
    assert message.startswith(f"--output_dir {str(out)!r} holds {str(out / 'checkpoint-3')!r}, a checkpoint of ")
    assert "ViTMAEMTOForPreTraining (model_type 'vit_mae_mto'), which this run of 'simmim_mto' cannot" in message
    assert message.endswith(f"train into another --output_dir, or delete {str(out)!r} to start over there.")
    # stopped before training: the other method's checkpoint is all the folder holds, untouched
    assert sorted(path.name for path in out.iterdir()) == ["checkpoint-3"]
    assert {path.name: path.read_bytes() for path in (out / "checkpoint-3").iterdir()} == saved

    # named explicitly: the advice is about that flag
    args.resume_from_checkpoint = str(out / "checkpoint-3")
    with pytest.raises(
        ValueError, match=r"^--resume_from_checkpoint .* ViTMAEMTOForPreTraining .* 'simmim_mto'.* out\.$"
    ):
        check_resumable(args.resume_from_checkpoint, "simmim_mto", args)
    # a checkpoint of the same model type, or one with no config.json (FSDP, DeepSpeed), goes on to the loading
    check_resumable(str(out / "checkpoint-3"), "vit_mae_mto", args)
    check_resumable(str(tmp_path), "simmim_mto", args)


@pytest.mark.parametrize("method", sorted(CASES))
def test_an_encoder_saved_alone_exports_and_fine_tunes(method, tmp_path):
    """Our encoder classes save `architectures: [ViTMAEMTOModel]` (or SimMIM's) under our model type: still ours."""
    config_class, model_class = CASES[method][1], CASES[method][2]
    torch.manual_seed(0)
    encoder = model_class(config_class(**(TINY_MAE if method == "mae" else TINY_SIMMIM))).vit
    encoder.save_pretrained(tmp_path / "encoder")
    assert json.loads((tmp_path / "encoder" / "config.json").read_text())["architectures"] == [type(encoder).__name__]
    for source, out in ((tmp_path / "encoder", "from-path"), (encoder, "from-model")):
        export_encoder(source, tmp_path / out)
        exported = ViTModel.from_pretrained(tmp_path / out, add_pooling_layer=False)
        torch.testing.assert_close(exported.layers[1].mlp.fc1.weight, encoder.layers[1].mlp.fc1.weight)
    classifier = build_classification_model(FinetuneArguments(model_name_or_path=str(tmp_path / "encoder")), "ab")
    torch.testing.assert_close(
        classifier.vit.layers[0].attention.q_proj.weight, encoder.layers[0].attention.q_proj.weight
    )


def test_a_saved_vit_config_without_architectures_is_not_taken_for_simmim(tmp_path):
    """`save_pretrained` always names the architecture; a `vit` config without one (hand-written, old) is a plain ViT."""
    torch.manual_seed(0)
    ViTModel(ViTConfig(**TINY_SIMMIM), add_pooling_layer=False).save_pretrained(tmp_path / "vit")
    config = json.loads((tmp_path / "vit" / "config.json").read_text())
    del config["architectures"]
    (tmp_path / "vit" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type 'vit'"):
        method_for(config)
    classifier = build_classification_model(FinetuneArguments(model_name_or_path=str(tmp_path / "vit")), ["a", "b"])
    assert type(classifier).__name__ == "ViTForImageClassification"
    # an upstream model built in memory names no architecture either, and is still its method's
    assert method_for(upstream_simmim().config) is method_for("simmim_mto")
