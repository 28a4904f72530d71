"""hf_mto.export: the pre-trained encoders become plain transformers ViT checkpoints that load without hf_mto."""

import json
import runpy
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import TINY_MAE, run_without_hf_mto
from transformers import (
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
    ViTMAEConfig,
    ViTMAEForPreTraining,
    ViTModel,
)
from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding

from hf_mto import SimMIMMTOConfig, SimMIMMTOForMaskedImageModeling, ViTMAEMTOConfig, ViTMAEMTOForPreTraining
from hf_mto.export import export_encoder

ROOT = Path(__file__).resolve().parents[1]
TINY_VIT = {key: TINY_MAE[key] for key in ("image_size", "patch_size", "hidden_size", "num_hidden_layers")}
TINY_VIT.update(num_attention_heads=4, intermediate_size=64)
MAE_PROCESSOR_MEAN = [0.5, 0.25, 0.125]  # distinctive: shows the checkpoint's processor is the one copied


def make_mae(seed=0):
    torch.manual_seed(seed)
    model = ViTMAEMTOForPreTraining(ViTMAEMTOConfig(**TINY_MAE)).eval()
    with torch.no_grad():  # move the trained encoder weights off their initial values, so a mix-up would show
        for param in model.vit.parameters():
            if param.requires_grad:  # the fixed sin-cos position table stays as pre-training leaves it
                param.add_(0.01 * torch.randn_like(param))
    return model


def make_simmim(seed=0):
    torch.manual_seed(seed)
    return SimMIMMTOForMaskedImageModeling(SimMIMMTOConfig(**TINY_VIT, encoder_stride=4)).eval()


def mae_unmasked_features(model: ViTMAEMTOForPreTraining, pixels: torch.Tensor) -> torch.Tensor:
    """Our MAE encoder on every patch: `model.vit` always masks, so its modules are run by hand, unmasked."""
    vit = model.vit
    pos = vit.embeddings.position_embeddings
    patches = vit.embeddings.patch_embeddings(pixels) + pos[:, 1:]
    cls = (vit.embeddings.cls_token + pos[:, :1]).expand(pixels.shape[0], -1, -1)
    hidden = torch.cat([cls, patches], dim=1)
    for layer in vit.layers:
        hidden = layer(hidden, None)
    return vit.layernorm(hidden)


def encoder_reference(model, pixels):
    """(encoder weights under ViTModel's keys, features on every patch), computed with our models."""
    weights = {k: v.clone() for k, v in model.vit.state_dict().items() if k != "embeddings.mask_token"}
    with torch.no_grad():
        if isinstance(model, ViTMAEMTOForPreTraining):
            features = mae_unmasked_features(model, pixels)
        else:
            features = model.vit(pixels).last_hidden_state  # no bool_masked_pos: nothing masked
    return weights, features


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Both models saved as checkpoints (MAE with an image processor, SimMIM without) and exported from the path."""
    root = tmp_path_factory.mktemp("export")
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.save(pixels, root / "pixels.pt")
    runs = {}
    for name, model in (("mae", make_mae()), ("simmim", make_simmim())):
        checkpoint = root / f"{name}-checkpoint"
        model.save_pretrained(checkpoint)
        if name == "mae":
            processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=MAE_PROCESSOR_MEAN)
            processor.save_pretrained(checkpoint)
        output = export_encoder(checkpoint, root / f"{name}-encoder")
        weights, features = encoder_reference(model, pixels)
        torch.save({"weights": weights, "features": features}, root / f"{name}-reference.pt")
        runs[name] = {"model": model, "checkpoint": checkpoint, "output": output, "weights": weights}
    return root, runs


@pytest.fixture(scope="module")
def report_without_hf_mto(exported, tmp_path_factory):
    """Load both exports in one fresh Python where hf_mto cannot be imported, without trust_remote_code."""
    root, _ = exported
    script = textwrap.dedent(
        f"""
        import json, pathlib, torch
        from transformers import AutoModelForImageClassification, ViTModel

        root = pathlib.Path({str(root)!r})
        pixels = torch.load(root / "pixels.pt")
        report = {{}}
        for name in ("mae", "simmim"):
            path = root / f"{{name}}-encoder"
            reference = torch.load(root / f"{{name}}-reference.pt")
            classifier, info = AutoModelForImageClassification.from_pretrained(
                path, num_labels=10, ignore_mismatched_sizes=True, output_loading_info=True
            )
            encoder = ViTModel.from_pretrained(path).eval()
            with torch.no_grad():
                features = encoder(pixels).last_hidden_state
            state = classifier.vit.state_dict()
            report[name] = {{
                "class": type(classifier).__module__ + "." + type(classifier).__name__,
                "info": {{key: sorted(map(str, value)) for key, value in info.items()}},
                "classifier_shape": list(classifier.classifier.weight.shape),
                "weight_keys_match": sorted(state) == sorted(reference["weights"]),
                "weights_differing": [k for k, v in reference["weights"].items() if not torch.equal(state[k], v)],
                "features_max_diff": (features - reference["features"]).abs().max().item(),
                "position_embeddings_trainable": encoder.embeddings.position_embeddings.requires_grad,
            }}
        import sys
        report["hf_mto_imported"] = sys.modules.get("hf_mto") is not None
        print(json.dumps(report))
        """
    )
    stdout = run_without_hf_mto(script, tmp_path_factory.mktemp("no_hf_mto"))
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["mae", "simmim"])
def test_export_loads_without_hf_mto(report_without_hf_mto, name):
    report = report_without_hf_mto[name]
    assert report_without_hf_mto["hf_mto_imported"] is False
    assert report["class"] == "transformers.models.vit.modeling_vit.ViTForImageClassification"
    info = report["info"]
    assert info["missing_keys"] == ["classifier.bias", "classifier.weight"]  # only the new head is initialised
    assert info["unexpected_keys"] == [] and info["mismatched_keys"] == [] and info["error_msgs"] == []
    assert report["classifier_shape"] == [10, 32]
    assert report["weight_keys_match"] and report["weights_differing"] == []
    assert report["features_max_diff"] < 1e-5
    # MAE's frozen sin-cos table becomes an ordinary trainable position embedding
    assert report["position_embeddings_trainable"] is True


@pytest.mark.parametrize("name", ["mae", "simmim"])
def test_exported_files(exported, name):
    _, runs = exported
    run = runs[name]
    output = run["output"]
    assert output == run["checkpoint"].parent / f"{name}-encoder"
    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == "vit" and config["architectures"] == ["ViTModel"]
    assert "auto_map" not in config
    assert not [key for key in config if key.startswith(("mto_", "decoder_", "use_mto", "mask_ratio", "norm_pix"))]
    source = run["model"].config
    for field in ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        assert config[field] == getattr(source, field)
    assert config["intermediate_size"] == 64 and config["encoder_stride"] == 4  # MAE: set to patch_size
    assert not (output / "modeling_vit_mae_mto.py").exists() and not (output / "mto.py").exists()

    processor = json.loads((output / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 32, "width": 32}
    expected_mean = MAE_PROCESSOR_MEAN if name == "mae" else [0.485, 0.456, 0.406]  # copied / ImageNet default
    assert processor["image_mean"] == pytest.approx(expected_mean)

    card = (output / "README.md").read_text()
    assert str(run["checkpoint"]) in card and source.model_type in card
    assert "AutoModelForImageClassification.from_pretrained" in card and "ignore_mismatched_sizes=True" in card


def test_mae_position_embeddings_keep_their_sincos_values(exported):
    _, runs = exported
    encoder = ViTModel.from_pretrained(runs["mae"]["output"], add_pooling_layer=False)
    position = encoder.embeddings.position_embeddings
    assert position.requires_grad
    assert torch.equal(position.detach(), runs["mae"]["weights"]["embeddings.position_embeddings"])
    table = build_2d_sinusoidal_position_embedding(height=8, width=8, embed_dim=32, cls_token=True)
    table = torch.cat([table[..., 16:], table[..., :16]], dim=-1)  # upstream MAE's layout
    torch.testing.assert_close(position.detach()[0], table)


@pytest.mark.parametrize("name", ["mae", "simmim"])
def test_export_from_instance_matches_export_from_path(exported, tmp_path, name):
    _, runs = exported
    run = runs[name]
    output = export_encoder(run["model"], tmp_path / "encoder")
    from_instance = ViTModel.from_pretrained(output, add_pooling_layer=False).state_dict()
    from_path = ViTModel.from_pretrained(run["output"], add_pooling_layer=False).state_dict()
    assert from_instance.keys() == from_path.keys()
    assert all(torch.equal(from_instance[key], from_path[key]) for key in from_path)
    assert (output / "preprocessor_config.json").is_file() and (output / "README.md").is_file()
    # the `.vit` encoder alone exports too
    encoder_only = export_encoder(run["model"].vit, tmp_path / "encoder-only")
    assert json.loads((encoder_only / "config.json").read_text())["model_type"] == "vit"


def test_not_ours_raises_naming_the_model_type(tmp_path):
    torch.manual_seed(0)
    plain = ViTForImageClassification(ViTConfig(**TINY_VIT, num_labels=3))
    plain.save_pretrained(tmp_path / "plain-vit")
    with pytest.raises(ValueError, match="model_type 'vit'"):
        export_encoder(tmp_path / "plain-vit", tmp_path / "out")
    with pytest.raises(ValueError, match="model_type 'vit'"):
        export_encoder(plain, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(TypeError):
        export_encoder(123, tmp_path / "out")


def test_upstream_mae_exports(tmp_path):
    """An official MAE (upstream `ViTMAEForPreTraining`, model_type vit_mae) exports like ours."""
    torch.manual_seed(0)
    upstream_mae = ViTMAEForPreTraining(ViTMAEConfig(**TINY_MAE))
    export_encoder(upstream_mae, tmp_path / "out")
    encoder = ViTModel.from_pretrained(tmp_path / "out", add_pooling_layer=False)
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, upstream_mae.vit.state_dict()[key]), key


def test_refuses_to_overwrite_the_checkpoint(exported):
    _, runs = exported
    checkpoint = runs["simmim"]["checkpoint"]
    with pytest.raises(ValueError, match="must differ"):
        export_encoder(checkpoint, checkpoint)
    assert json.loads((checkpoint / "config.json").read_text())["model_type"] == "simmim_mto"


def test_recipe_cli(exported, tmp_path, monkeypatch):
    _, runs = exported
    output = tmp_path / "cli-encoder"
    argv = ["export_encoder.py", "--checkpoint", str(runs["mae"]["checkpoint"]), "--output_dir", str(output)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(ROOT / "recipes" / "export_encoder.py"), run_name="__main__")
    assert json.loads((output / "config.json").read_text())["model_type"] == "vit"
    exported_weights = ViTModel.from_pretrained(output, add_pooling_layer=False).state_dict()
    assert all(torch.equal(exported_weights[k], v) for k, v in runs["mae"]["weights"].items())
