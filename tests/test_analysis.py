"""hf_mto.analysis and recipes/analyze.py: heterogeneity per layer, affinity maps, reconstructions, the callback."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_MAE, TINY_SIMMIM
from PIL import Image
from test_recipe_pretrain import FASHION_MNIST
from transformers import ViTMAEConfig, ViTMAEForPreTraining
from transformers.models.vit_mae.modeling_vit_mae import ViTMAEDecoderOutput

from hf_mto import SimMIMMTOConfig, SimMIMMTOForMaskedImageModeling, ViTMAEMTOConfig, ViTMAEMTOForPreTraining
from hf_mto.analysis import (
    MASKED_GREY,
    ReconstructionCallback,
    affinity_maps,
    analyze_affinity,
    analyze_heterogeneity,
    check_model,
    draw_mask_inputs,
    layer_entropies,
    load_checkpoint,
    masked_first_order,
    plot_affinity_maps,
    plot_heterogeneity,
    plot_reconstructions,
    reconstruct,
    run_model,
)
from hf_mto.data import IMAGENET_MEAN, IMAGENET_STD, build_image_processor
from hf_mto.mto import heterogeneity
from hf_mto.trainer import MTOTrainer
from hf_mto.training_args import MTOTrainingArguments

ROOT = Path(__file__).resolve().parents[1]
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def tiny_mae(seed=0, **overrides):
    torch.manual_seed(seed)
    return ViTMAEMTOForPreTraining(ViTMAEMTOConfig(**{**TINY_MAE, **overrides})).eval()


def tiny_simmim(seed=0, **overrides):
    torch.manual_seed(seed)
    return SimMIMMTOForMaskedImageModeling(SimMIMMTOConfig(**{**TINY_SIMMIM, **overrides})).eval()


def images_01(n=4, seed=0):
    """Images in [0, 1] and their ImageNet-normalised pixels."""
    images = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return images, (images - MEAN) / STD


# --------------------------------------------------------------------------------------------------------------------
# Heterogeneity
# --------------------------------------------------------------------------------------------------------------------


def test_layer_entropies_hand_computed():
    # 4 tokens in 2-D, tokens 0 and 1 masked. a = ln(3)/2 makes token 1's logits to the visible tokens +-a, i.e. p =
    # (3/4, 1/4); token 0 is the zero vector, so its affinity to the two visible tokens is uniform.
    a = math.log(3) / 2
    hidden = torch.tensor([[[0.0, 0.0], [a, 0.0], [1.0, 0.0], [-1.0, 0.0]]])
    mask = torch.tensor([[True, True, False, False]])
    entropies = layer_entropies([hidden, 2 * hidden], mask, affinity="dot")
    row1 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert entropies["heterogeneity"][0, 0].item() == pytest.approx((math.log(2) + row1) / 2, abs=1e-6)

    # visible rows over all four tokens: token 2 has logits (0, a, 1, -1), token 3 the negatives of those
    def entropy(logits):
        z = sum(math.exp(v) for v in logits)
        return -sum(math.exp(v) / z * (v - math.log(z)) for v in logits)

    expected_visible = (entropy([0, a, 1, -1]) + entropy([0, -a, -1, 1])) / 2
    assert entropies["sparsity_loss"][0, 0].item() == pytest.approx(expected_visible, abs=1e-6)
    # layer "1" (the states doubled) is checked against the library's own Eq. 2
    assert entropies["heterogeneity"][1].tolist() == pytest.approx(heterogeneity(2 * hidden, mask, "dot").tolist())
    assert entropies["heterogeneity"].shape == (2, 1)


def test_mae_heterogeneity_equals_the_models_own_terms():
    # The model computes H on the decoder's shuffled (visible-first) order; the analysis unshuffles to patch order
    # and uses the masked/visible selection of `mto.heterogeneity`: two paths that must agree.
    model = tiny_mae()
    _, pixels = images_01()
    noise = torch.rand(4, 64, generator=torch.Generator().manual_seed(3))
    model_pass = run_model(model, pixels, {"noise": noise})
    assert len(model_pass.states["decoder"]) == 3 and model_pass.states["decoder"][0].shape == (4, 64, 32)
    entropies = layer_entropies(model_pass.states["decoder"], model_pass.mask)
    expected = model(pixels, noise=noise, use_mto=True).heterogeneity  # [B, L+1]
    torch.testing.assert_close(entropies["heterogeneity"].T, expected, rtol=1e-5, atol=1e-6)
    expected = expected.mean(dim=0)
    for layer, state in enumerate(model_pass.states["decoder"]):
        per_image = heterogeneity(state, model_pass.mask)
        assert entropies["heterogeneity"][layer].tolist() == pytest.approx(per_image.tolist(), rel=1e-6)
    assert torch.equal(model_pass.mask, model(pixels, noise=noise).mask.bool())

    # analyze_heterogeneity draws the same noise from its seed and averages over the images
    result = analyze_heterogeneity(model, pixels, batch_size=4, seed=3)
    assert result.heterogeneity == pytest.approx(expected.tolist(), rel=1e-5)
    assert (result.num_images, result.num_tokens, result.num_masked, result.stack) == (4, 64, 48.0, "decoder")
    assert result.uniform_entropy == pytest.approx(math.log(16))
    # the same seed gives the same numbers, in batches of any size here (the noise is one stream)
    again = analyze_heterogeneity(model, pixels, batch_size=4, seed=3)
    assert again.heterogeneity == result.heterogeneity
    assert analyze_heterogeneity(model, pixels, batch_size=4, seed=4).heterogeneity != result.heterogeneity


def test_mae_states_come_in_patch_order():
    # H^0 of a masked patch p is the mask token plus the decoder's position embedding of p: only true in patch order
    # (the decoder itself runs on the shuffled order), which the affinity maps rely on.
    model = tiny_mae()
    _, pixels = images_01(2)
    model_pass = run_model(model, pixels, {"noise": torch.rand(2, 64, generator=torch.Generator().manual_seed(0))})
    expected = model.decoder.mask_token[0, 0] + model.decoder.decoder_pos_embed[0, 1:]  # [64, D]
    for b in range(2):
        masked = model_pass.mask[b].nonzero().squeeze(1)
        assert torch.allclose(model_pass.states["decoder"][0][b, masked], expected[masked], atol=1e-6)
        visible = (~model_pass.mask[b]).nonzero().squeeze(1)
        assert not torch.allclose(model_pass.states["decoder"][0][b, visible], expected[visible], atol=1e-3)


def test_analysis_works_with_mto_off_in_the_config():
    model = tiny_mae(use_mto=False)
    _, pixels = images_01(2)
    noise = torch.rand(2, 64, generator=torch.Generator().manual_seed(0))
    assert model(pixels, noise=noise).heterogeneity is None
    result = analyze_heterogeneity(model, pixels, seed=0)
    expected = model(pixels, noise=noise, use_mto=True).heterogeneity.mean(dim=0)
    assert result.heterogeneity == pytest.approx(expected.tolist())


def test_simmim_heterogeneity_equals_the_models_own_terms():
    model = tiny_simmim()
    _, pixels = images_01(3)
    mask_inputs = draw_mask_inputs(model, 3, torch.Generator().manual_seed(1), mask_patch_size=8)
    mask = mask_inputs["bool_masked_pos"]
    assert mask.shape == (3, 64) and (mask.sum(dim=1) == 4 * round(0.6 * 16)).all()  # 8 px squares of 2x2 patches
    model_pass = run_model(model, pixels, mask_inputs)
    entropies = layer_entropies(model_pass.states["encoder"], model_pass.mask)
    expected = model(pixels, bool_masked_pos=mask, use_mto=True).heterogeneity  # [B, L+1]
    torch.testing.assert_close(entropies["heterogeneity"].T, expected, rtol=1e-5, atol=1e-6)
    expected = expected.mean(dim=0)
    result = analyze_heterogeneity(model, pixels, seed=1, mask_patch_size=8)
    assert result.heterogeneity == pytest.approx(expected.tolist(), rel=1e-5)
    assert (result.stack, result.masking, result.mask_patch_size) == ("encoder", "simmim_block", 8)


def test_json_table_and_plot(tmp_path):
    model = tiny_mae()
    _, pixels = images_01(5)
    dataset = [{"pixel_values": p} for p in pixels]  # any dataset of dicts works, as apply_transform's does
    result = analyze_heterogeneity(model, dataset, batch_size=2)
    assert result.heterogeneity == pytest.approx(analyze_heterogeneity(model, pixels, batch_size=2).heterogeneity)
    saved = json.loads(result.save_json(tmp_path / "h.json").read_text())
    assert len(saved["heterogeneity"]) == len(saved["sparsity_loss"]) == TINY_MAE["decoder_num_hidden_layers"] + 1
    assert saved["num_images"] == 5 and saved["model_type"] == "vit_mae_mto"
    table = result.table()
    assert table.count("\n") >= 6 and f"{result.heterogeneity[2]:.4f}" in table
    path = plot_heterogeneity(result, tmp_path / "h.png")
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (600, 408)  # 5 x 3.4 in at 120 dpi


# --------------------------------------------------------------------------------------------------------------------
# Affinity maps
# --------------------------------------------------------------------------------------------------------------------


def test_masked_first_order():
    mask = torch.tensor([False, True, False, True, True])
    assert masked_first_order(mask).tolist() == [1, 3, 4, 0, 2]
    with pytest.raises(ValueError, match="1-D bool"):
        masked_first_order(mask.int())


def test_affinity_maps_are_the_softmax_permuted_masked_first():
    torch.manual_seed(0)
    states = [torch.randn(2, 6, 4), torch.randn(2, 6, 4)]
    mask = torch.tensor([[False, True, False, True, False, False], [True, False, False, False, True, False]])
    maps, order, num_masked = affinity_maps(states, mask, index=1, layers=[1])
    assert num_masked == 2 and order.tolist() == [0, 4, 1, 2, 3, 5]
    assert mask[1, order[:num_masked]].all() and not mask[1, order[num_masked:]].any()
    unit = torch.nn.functional.normalize(states[1][1], dim=-1)
    probs = torch.softmax(unit @ unit.T / 0.1, dim=-1)  # the default affinity: the cosine / 0.1
    assert maps.shape == (1, 6, 6)
    for i in range(6):
        for j in range(6):
            assert maps[0, i, j].item() == pytest.approx(probs[order[i], order[j]].item(), rel=1e-5)
    assert torch.allclose(maps.sum(dim=-1), torch.ones(1, 6))  # rows stay distributions


def test_affinity_uses_the_config_affinity():
    torch.manual_seed(0)
    states = [torch.randn(1, 4, 8)]
    mask = torch.tensor([[True, False, True, False]])
    maps, order, _ = affinity_maps(states, mask, affinity="cosine", temperature=0.5)
    x = torch.nn.functional.normalize(states[0][0], dim=-1)
    probs = torch.softmax(x @ x.T / 0.5, dim=-1)
    assert torch.allclose(maps[0], probs[order][:, order], atol=1e-6)


def test_analyze_affinity_writes_a_panel_per_layer(tmp_path):
    model = tiny_mae()
    _, pixels = images_01(1)
    info = analyze_affinity(
        model, pixels[0], tmp_path / "a.png", seed=2, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD
    )
    assert info["layers"] == [0, 1, 2] and info["num_masked"] == 48
    mask = torch.tensor(info["mask"])
    assert mask[info["order"][:48]].all() and not mask[info["order"][48:]].any()
    # its per-layer H is the model's for that image and mask
    noise = torch.rand(1, 64, generator=torch.Generator().manual_seed(2))
    assert info["heterogeneity"] == pytest.approx(model(pixels, noise=noise, use_mto=True).heterogeneity[0].tolist())
    with Image.open(tmp_path / "a.png") as image:
        assert image.size == (4 * 312, 360)  # image + 3 layers, 2.6 x 3.0 in each at 120 dpi
    # a subset of layers gives fewer panels
    analyze_affinity(model, pixels[0], tmp_path / "b.png", layers=[2])
    with Image.open(tmp_path / "b.png") as image:
        assert image.size == (312, 360)


def test_bad_layer_and_image_indices_are_clear_errors(tmp_path):
    model = tiny_mae()
    _, pixels = images_01(2)
    states = run_model(model, pixels, {"noise": torch.rand(2, 64)}).states["decoder"]
    mask = torch.zeros(2, 64, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"layers \[3\].*\[0, 2\]"):
        affinity_maps(states, mask, layers=[3])
    with pytest.raises(ValueError, match=r"layers \[-1\]"):
        analyze_affinity(model, pixels[0], tmp_path / "x.png", layers=[-1])
    with pytest.raises(ValueError, match="image index 2 out of range for a batch of 2"):
        affinity_maps(states, mask, index=2)
    with pytest.raises(ValueError, match="one image"):
        analyze_affinity(model, pixels, tmp_path / "x.png")
    with pytest.raises(ValueError, match="maps"):
        plot_affinity_maps(torch.zeros(2, 4, 4), 2, tmp_path / "x.png", layers=[0])  # 1 layer name for 2 maps


def test_models_that_are_not_ours_are_rejected(tmp_path):
    upstream = ViTMAEForPreTraining(ViTMAEConfig(**TINY_MAE))
    with pytest.raises(ValueError, match="ViTMAEForPreTraining"):
        check_model(upstream)
    # an upstream checkpoint is analysed through our class that extends it (official MAEs, the paper's Table 1)
    upstream.save_pretrained(tmp_path / "upstream")
    assert isinstance(load_checkpoint(tmp_path / "upstream"), ViTMAEMTOForPreTraining)
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match=r"model_type 'bert'.*simmim_mto.*vit_mae"):
        load_checkpoint(tmp_path / "bert")
    with pytest.raises(ValueError, match="masking must be one of"):
        draw_mask_inputs(tiny_mae(), 2, masking="evolved")
    with pytest.raises(ValueError, match="the model masks 45"):  # MAE with a block mask of another count
        draw_mask_inputs(tiny_mae(mask_ratio=0.7), 2, masking="simmim_block", mask_patch_size=8)


def test_analysis_follows_a_registered_methods_declarations(dummy_method):
    # SimMIM's model under a method of its own whose default masking is beit_block: the analysis draws that masking,
    # hands it to the model through the method's mask_inputs and measures the method's MTO stack
    torch.manual_seed(0)
    model = dummy_method.model_class(dummy_method.config_class(**TINY_SIMMIM)).eval()
    assert check_model(model) is dummy_method
    _, pixels = images_01(3)
    result = analyze_heterogeneity(model, pixels, seed=1)
    assert (result.stack, result.masking, result.mask_patch_size) == ("encoder", "beit_block", None)
    (mask,) = dummy_method.masks
    assert mask.shape == (3, 64) and (mask.sum(dim=1) == round(0.6 * 64)).all()
    expected = model(pixels, bool_masked_pos=mask, use_mto=True).heterogeneity.mean(dim=0)
    assert result.heterogeneity == pytest.approx(expected.tolist(), rel=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# Reconstructions
# --------------------------------------------------------------------------------------------------------------------


def oracle(model, target_of):
    """Make `model`'s decoder predict `target_of(pixel_values)` (patch order) whatever its weights."""
    forward = model.decoder.forward
    state = {}

    def patched(*args, **kwargs):
        out = forward(*args, **kwargs)
        return ViTMAEDecoderOutput(logits=target_of(state["pixels"]), hidden_states=out.hidden_states)

    model.decoder.forward = patched
    return state


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_mae_oracle_prediction_reconstructs_the_original(norm_pix_loss):
    model = tiny_mae(norm_pix_loss=norm_pix_loss)
    images, pixels = images_01(3)

    def target_of(pixel_values):  # exactly the loss's target: normalised per patch with norm_pix_loss
        target = model.patchify(pixel_values)
        if norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        return target

    state = oracle(model, target_of)
    state["pixels"] = pixels
    noise = torch.rand(3, 64, generator=torch.Generator().manual_seed(0))
    assert model(pixels, noise=noise).loss.item() == pytest.approx(0.0, abs=1e-10)  # the oracle is perfect
    pictures = reconstruct(model, pixels, {"noise": noise}, IMAGENET_MEAN, IMAGENET_STD)
    expected = images.permute(0, 2, 3, 1).numpy()
    assert abs(pictures.original - expected).max() < 1e-5
    assert abs(pictures.reconstruction - expected).max() < 1e-4
    assert abs(pictures.composite - expected).max() < 1e-4
    # the masked panel: original where visible, grey where masked (48 of 64 patches of 4x4 pixels)
    grey = (pictures.masked == MASKED_GREY).all(axis=-1)
    assert grey.sum() == 3 * 48 * 16
    assert abs(pictures.masked[~grey] - expected[~grey]).max() < 1e-5


def test_composite_pastes_visible_patches_and_simmim_is_unnormalised():
    model = tiny_simmim()
    images, pixels = images_01(2)
    mask_inputs = draw_mask_inputs(model, 2, torch.Generator().manual_seed(0), mask_patch_size=8)
    pictures = reconstruct(model, pixels, mask_inputs, IMAGENET_MEAN, IMAGENET_STD)
    with torch.no_grad():
        raw = model(pixels, **mask_inputs).reconstruction
    expected_rec = (raw * STD + MEAN).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(pictures.reconstruction - expected_rec).max() < 1e-5
    hidden = mask_inputs["bool_masked_pos"].view(2, 8, 8).repeat_interleave(4, 1).repeat_interleave(4, 2).numpy()
    original = images.permute(0, 2, 3, 1).numpy()
    assert abs(pictures.composite[hidden] - expected_rec[hidden]).max() < 1e-6
    assert abs(pictures.composite[~hidden] - original[~hidden]).max() < 1e-5
    assert pictures.grid().shape == (2 * 34 + 2, 4 * 34 + 2, 3)


def test_plot_reconstructions_size(tmp_path):
    model = tiny_mae()
    _, pixels = images_01(2)
    pictures = reconstruct(model, pixels, {"noise": torch.rand(2, 64)}, IMAGENET_MEAN, IMAGENET_STD)
    with Image.open(plot_reconstructions(pictures, tmp_path / "r.png")) as image:
        assert image.size == (720, 400)  # 7.2 x 4.0 in at 100 dpi


# --------------------------------------------------------------------------------------------------------------------
# Trainer callback
# --------------------------------------------------------------------------------------------------------------------


class Images(torch.utils.data.Dataset):
    def __init__(self, n=8):
        self.pixels = images_01(n, seed=5)[1]

    def __len__(self):
        return len(self.pixels)

    def __getitem__(self, i):
        return {"pixel_values": self.pixels[i]}


def trainer_args(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=2,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
    )
    return MTOTrainingArguments(**{**kwargs, **overrides})


def test_callback_writes_a_picture_at_each_evaluation(tmp_path):
    model = tiny_mae()
    callback = ReconstructionCallback(Images(), IMAGENET_MEAN, IMAGENET_STD, num_images=3, seed=1)
    args = trainer_args(tmp_path)
    trainer = MTOTrainer(model=model, args=args, train_dataset=Images(), eval_dataset=Images(), callbacks=[callback])
    trainer.evaluate()
    path = tmp_path / "run" / "reconstructions" / "step-0.png"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (720, 610)  # 3 rows of 1.8 in + titles at 100 dpi
    first = callback.mask_inputs(model)["noise"].clone()
    trainer.train()  # evaluates nothing by default; evaluate again after two steps
    trainer.evaluate()
    assert (tmp_path / "run" / "reconstructions" / "step-2.png").is_file()
    assert torch.equal(callback.mask_inputs(model)["noise"], first)  # the same mask every time
    # called in training mode, the callback leaves the model in training mode
    model.train()
    callback.on_evaluate(args, trainer.state, trainer.control, model=model)
    assert model.training


def test_callback_follows_the_trainers_simmim_masking(tmp_path):
    model = tiny_simmim()
    callback = ReconstructionCallback(Images(), IMAGENET_MEAN, IMAGENET_STD, num_images=2)
    args = trainer_args(tmp_path, mask_patch_size=16)
    trainer = MTOTrainer(model=model, args=args, eval_dataset=Images(), callbacks=[callback])
    trainer.evaluate()
    mask = callback.mask_inputs(model)["bool_masked_pos"].view(2, 8, 8)
    assert (mask.sum(dim=(1, 2)) == 16 * round(0.6 * 4)).all()  # 16 px squares (4x4 patches) of the 32 px image
    assert torch.equal(mask[:, :4, :4].flatten(1).all(1) | ~mask[:, :4, :4].flatten(1).any(1), torch.ones(2).bool())
    assert (tmp_path / "run" / "reconstructions" / "step-0.png").is_file()


def test_callback_writes_into_the_trainers_tensorboard_run(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = tiny_mae()
    args = trainer_args(tmp_path, report_to="tensorboard", eval_strategy="steps", eval_steps=2, logging_steps=1)
    trainer = MTOTrainer(model=model, args=args, train_dataset=Images(), eval_dataset=Images())
    ReconstructionCallback(Images(), IMAGENET_MEAN, IMAGENET_STD, num_images=2).attach(trainer)
    trainer.train()
    assert (tmp_path / "run" / "reconstructions" / "step-2.png").is_file()
    runs = [d for d in (tmp_path / "run" / "runs").iterdir() if d.is_dir()]
    assert len(runs) == 1  # the trainer's own run, no second one
    events = EventAccumulator(str(runs[0]), size_guidance={"images": 0}).Reload()
    assert "reconstructions" in events.Tags()["images"]
    image = events.Images("reconstructions")[0]
    assert (image.step, image.width, image.height) == (2, 4 * 34 + 2, 2 * 34 + 2)
    assert "eval/loss" in events.Tags()["scalars"]


def test_callback_without_attach_opens_its_own_tensorboard_writer(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)  # a bare evaluate() makes the TensorBoardCallback write to ./runs
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    callback = ReconstructionCallback(Images(), IMAGENET_MEAN, IMAGENET_STD, num_images=2)
    args = trainer_args(tmp_path, report_to="tensorboard")
    trainer = MTOTrainer(model=tiny_mae(), args=args, eval_dataset=Images(), callbacks=[callback])
    trainer.evaluate()
    events = EventAccumulator(str(tmp_path / "run" / "runs" / "reconstructions")).Reload()
    assert events.Tags()["images"] == ["reconstructions"]
    callback.on_train_end(args, trainer.state, trainer.control)
    assert callback._own_writer is None


def test_callback_bad_arguments():
    with pytest.raises(ValueError, match="non-empty eval_dataset"):
        ReconstructionCallback([], IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(ValueError, match="num_images must be >= 1, got 0"):
        ReconstructionCallback(Images(), IMAGENET_MEAN, IMAGENET_STD, num_images=0)


# --------------------------------------------------------------------------------------------------------------------
# Recipe
# --------------------------------------------------------------------------------------------------------------------


def save_checkpoint(model, path):
    model.save_pretrained(path)
    build_image_processor(model.config).save_pretrained(path)
    return path


@pytest.mark.skipif(not FASHION_MNIST.exists(), reason="needs Debian's dataset-fashion-mnist")
def test_recipe_runs_on_a_saved_checkpoint(tmp_path):
    checkpoint = save_checkpoint(tiny_mae(), tmp_path / "ckpt")
    out = tmp_path / "analysis"
    cmd = [sys.executable, str(ROOT / "recipes" / "analyze.py"), "--checkpoint", str(checkpoint)]
    cmd += ["--output_dir", str(out), "--max_eval_samples", "8", "--max_train_samples", "8", "--batch_size", "4"]
    cmd += ["--num_reconstructions", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "heterogeneity H" in result.stdout and "8 images" in result.stdout
    names = {"heterogeneity.json", "heterogeneity.png", "affinity.png", "affinity.json", "reconstructions.png"}
    assert names <= {p.name for p in out.iterdir()}
    saved = json.loads((out / "heterogeneity.json").read_text())
    assert len(saved["heterogeneity"]) == 3 and saved["extra"]["checkpoint"] == str(checkpoint)
    for name in ("heterogeneity.png", "affinity.png", "reconstructions.png"):
        with Image.open(out / name) as image:
            image.verify()


@pytest.mark.skipif(not FASHION_MNIST.exists(), reason="needs Debian's dataset-fashion-mnist")
def test_recipe_on_simmim_and_bad_image_index(tmp_path):
    sys.path.insert(0, str(ROOT / "recipes"))
    import analyze

    checkpoint = save_checkpoint(tiny_simmim(), tmp_path / "ckpt")
    common = ["--checkpoint", str(checkpoint), "--max_eval_samples", "4", "--max_train_samples", "4"]
    out = analyze.main([*common, "--output_dir", str(tmp_path / "a"), "--mask_patch_size", "8"])
    saved = json.loads((out / "heterogeneity.json").read_text())
    assert (saved["stack"], len(saved["heterogeneity"]), saved["mask_patch_size"]) == ("encoder", 3, 8)
    with pytest.raises(ValueError, match="affinity_image 4 out of range"):
        analyze.main([*common, "--output_dir", str(tmp_path / "b"), "--affinity_image", "4"])
