"""MTOTrainingArguments / MTOTrainer: weighted loss, logging of every component, learning-rate rule."""

import pytest
import torch
from conftest import TINY_MAE, TINY_SIMMIM, RandomImages
from transformers import ViTConfig, ViTForMaskedImageModeling, ViTMAEConfig, ViTMAEForPreTraining

from hf_mto import (
    SimMIMMTOConfig,
    SimMIMMTOForMaskedImageModeling,
    SimMIMMTOMethod,
    ViTMAEMTOConfig,
    ViTMAEMTOForPreTraining,
    ViTMAEMTOMethod,
)
from hf_mto.trainer import MTOTrainer
from hf_mto.training_args import MTOTrainingArguments


def make_args(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=4,
        logging_steps=2,
        save_strategy="no",
        report_to="none",
        base_learning_rate=1e-2,
        use_cpu=True,
        seed=0,
    )
    return MTOTrainingArguments(**{**kwargs, **overrides})


def test_defaults_follow_mae_and_lr_scales_with_total_batch(tmp_path):
    args = make_args(tmp_path, per_device_train_batch_size=16, gradient_accumulation_steps=4, base_learning_rate=1e-3)
    assert (args.adam_beta1, args.adam_beta2, args.weight_decay) == (0.9, 0.95, 0.05)
    assert args.total_train_batch_size == 64
    assert args.learning_rate == pytest.approx(1e-3 * 64 / 256)
    args = make_args(tmp_path, base_learning_rate=None, learning_rate=3e-4)
    assert args.learning_rate == 3e-4


@pytest.mark.parametrize("name", ["mto_spa_weight", "mto_e_weight", "mto_r_weight"])
def test_negative_weight_raises_naming_the_value(tmp_path, name):
    with pytest.raises(ValueError, match=f"{name}.*-0.5"):
        make_args(tmp_path, **{name: -0.5})


def test_training_steps_change_every_parameter_and_log_every_component(tmp_path):
    torch.manual_seed(0)
    model = ViTMAEMTOForPreTraining(ViTMAEMTOConfig(**TINY_MAE))
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    args = make_args(tmp_path, mto_spa_weight=0.1, mto_e_weight=0.2, mto_r_weight=0.3)  # distinct: a swap shows
    trainer = MTOTrainer(model=model, args=args, train_dataset=RandomImages())
    trainer.train()
    unchanged = [name for name, p in model.named_parameters() if p.requires_grad and torch.equal(p, before[name])]
    assert unchanged == []
    logs = [entry for entry in trainer.state.log_history if "reconstruction_loss" in entry]
    assert len(logs) == 2  # steps 2 and 4
    expected = {
        "loss",
        "reconstruction_loss",
        "mto/sparsity_loss",
        "mto/singularity_loss",
        "mto/ranking_loss",
        "mto/heterogeneity/layer_0",
        "mto/heterogeneity/layer_1",
        "mto/heterogeneity/layer_2",
    }
    for entry in logs:
        assert expected <= set(entry)
        # the logged total is the weighted sum of the logged components (both averaged over the same steps)
        args = trainer.args
        weighted = (
            entry["reconstruction_loss"]
            + args.mto_spa_weight * entry["mto/sparsity_loss"]
            + args.mto_e_weight * entry["mto/singularity_loss"]
            + args.mto_r_weight * entry["mto/ranking_loss"]
        )
        assert entry["loss"] == pytest.approx(weighted, rel=1e-4)


def test_compute_loss_weights_each_term(tmp_path):
    torch.manual_seed(0)
    model = ViTMAEMTOForPreTraining(ViTMAEMTOConfig(**TINY_MAE)).eval()
    pixels = torch.randn(4, 3, 32, 32)
    noise = torch.rand(4, 64)
    args = make_args(tmp_path, mto_spa_weight=0.5, mto_e_weight=2.0, mto_r_weight=0.25)
    trainer = MTOTrainer(model=model, args=args)
    loss, out = trainer.compute_loss(model, {"pixel_values": pixels, "noise": noise}, return_outputs=True)
    expected = out.loss + 0.5 * out.sparsity_loss + 2.0 * out.singularity_loss + 0.25 * out.ranking_loss
    assert torch.allclose(loss, expected)


def test_heterogeneity_is_logged_per_layer_as_the_batch_mean_of_the_per_image_values(tmp_path):
    torch.manual_seed(0)
    model = SimMIMMTOForMaskedImageModeling(SimMIMMTOConfig(**TINY_SIMMIM)).eval()
    pixels = torch.randn(4, 3, 32, 32)
    mask = torch.stack([torch.randperm(64) < 38 for _ in range(4)])
    mask[3] = False  # nothing masked: H undefined for that image, left out of the logged mean
    trainer = MTOTrainer(model=model, args=make_args(tmp_path))
    _, out = trainer.compute_loss(model, {"pixel_values": pixels, "bool_masked_pos": mask}, return_outputs=True)
    assert out.heterogeneity.shape == (4, 3) and (out.heterogeneity[3] == 0).all()
    logged = trainer._metric_sums["eval"]
    for layer in range(3):
        expected = out.heterogeneity[:3, layer].mean()
        torch.testing.assert_close(logged[f"mto/heterogeneity/layer_{layer}"], expected)


def test_all_weights_zero_is_upstream_loss_and_skips_mto(tmp_path):
    torch.manual_seed(0)
    model = ViTMAEMTOForPreTraining(ViTMAEMTOConfig(**TINY_MAE)).eval()
    args = make_args(tmp_path, mto_spa_weight=0.0, mto_e_weight=0.0, mto_r_weight=0.0)
    assert not args.use_mto
    trainer = MTOTrainer(model=model, args=args)
    inputs = {"pixel_values": torch.randn(4, 3, 32, 32), "noise": torch.rand(4, 64)}
    loss, out = trainer.compute_loss(model, inputs, return_outputs=True)
    assert out.heterogeneity is None
    assert torch.equal(loss, model(**inputs, use_mto=False).loss)


def test_evaluate_reports_loss_and_mto_terms(tmp_path):
    torch.manual_seed(0)
    model = ViTMAEMTOForPreTraining(ViTMAEMTOConfig(**TINY_MAE))
    trainer = MTOTrainer(model=model, args=make_args(tmp_path), eval_dataset=RandomImages(16))
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_reconstruction_loss", "eval_mto/ranking_loss", "eval_mto/heterogeneity/layer_2"} <= set(
        metrics
    )
    assert metrics["eval_loss"] > metrics["eval_reconstruction_loss"] > 0


def tiny_simmim(seed=0):
    torch.manual_seed(seed)
    return SimMIMMTOForMaskedImageModeling(SimMIMMTOConfig(**TINY_SIMMIM))


def test_simmim_training_steps_change_every_parameter_with_block_masks(tmp_path):
    model = tiny_simmim()
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    args = make_args(tmp_path, mask_patch_size=8)
    trainer = MTOTrainer(model=model, args=args, train_dataset=RandomImages())
    assert trainer.mask_generator.strategy == "simmim_block" and trainer.method.mask_input_name == "bool_masked_pos"
    trainer.train()
    unchanged = [name for name, p in model.named_parameters() if p.requires_grad and torch.equal(p, before[name])]
    assert unchanged == []
    assert "mto/heterogeneity/layer_2" in trainer.state.log_history[0]


@pytest.mark.parametrize("masking", ["random", "simmim_block", "beit_block"])
def test_trainer_masks_reach_the_model(tmp_path, masking):
    model = tiny_simmim().eval()
    trainer = MTOTrainer(model=model, args=make_args(tmp_path, masking=masking, mask_patch_size=8))
    _, out = trainer.compute_loss(model, {"pixel_values": torch.randn(4, 3, 32, 32)}, return_outputs=True)
    assert out.mask.shape == (4, 64)
    assert (out.mask.sum(dim=1) == trainer.mask_generator.num_masked).all()


def test_mae_with_block_masks_masks_exactly_the_generated_patches(tmp_path):
    # 0.625 x 64 = 40 = 10 SimMIM squares of 2 x 2 patches: both counts agree
    model = ViTMAEMTOForPreTraining(ViTMAEMTOConfig(**{**TINY_MAE, "mask_ratio": 0.625})).eval()
    trainer = MTOTrainer(model=model, args=make_args(tmp_path, masking="simmim_block", mask_patch_size=8))
    pixels = torch.randn(4, 3, 32, 32)
    torch.manual_seed(5)
    _, out = trainer.compute_loss(model, {"pixel_values": pixels}, return_outputs=True)
    torch.manual_seed(5)
    expected = trainer.mask_generator(4)
    assert torch.equal(out.mask.bool(), expected)


def test_mae_block_mask_count_mismatch_is_a_clear_error(tmp_path):
    model = ViTMAEMTOForPreTraining(ViTMAEMTOConfig(**{**TINY_MAE, "mask_ratio": 0.6}))  # MAE masks 39 of 64
    with pytest.raises(ValueError, match="simmim_block masking: 40 of 64.*masks 39.*0.625"):
        MTOTrainer(model=model, args=make_args(tmp_path, masking="simmim_block", mask_patch_size=8))


def test_unknown_masking_strategy_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="'checkerboard'"):
        make_args(tmp_path, masking="checkerboard")


def test_evaluation_components_take_the_evaluation_prefix(tmp_path):
    import torch
    from conftest import TINY_MAE

    from hf_mto import ViTMAEMTOConfig, ViTMAEMTOForPreTraining
    from hf_mto.trainer import MTOTrainer
    from hf_mto.training_args import MTOTrainingArguments

    model = ViTMAEMTOForPreTraining(ViTMAEMTOConfig(**TINY_MAE))
    images = [{"pixel_values": torch.randn(3, 32, 32)} for _ in range(8)]
    args = MTOTrainingArguments(output_dir=str(tmp_path), report_to="none", per_device_eval_batch_size=4)
    trainer = MTOTrainer(model=model, args=args, eval_dataset={"a": images, "b": images[:4]})
    metrics = trainer.evaluate()
    assert "eval_a_reconstruction_loss" in metrics and "eval_b_mto/ranking_loss" in metrics
    test = trainer.evaluate(images, metric_key_prefix="test")
    assert "test_reconstruction_loss" in test and not any(k.startswith("eval_") for k in test)
    logged = [k for entry in trainer.state.log_history for k in entry]
    assert "test_mto/sparsity_loss" in logged and "eval_a_mto/sparsity_loss" in logged


# --------------------------------------------------------------------------------------------------------------------
# The trainer reads the method's declarations (hf_mto.methods)
# --------------------------------------------------------------------------------------------------------------------


def test_the_trainer_follows_a_registered_methods_declarations(tmp_path, dummy_method):
    torch.manual_seed(0)
    model = dummy_method.model_class(dummy_method.config_class(**TINY_SIMMIM))
    # 3 optimizer steps of 2 accumulated micro-batches of 4 images
    args = make_args(tmp_path, max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    trainer = MTOTrainer(model=model, args=args, train_dataset=RandomImages())
    assert trainer.method is dummy_method
    assert trainer.mask_generator.strategy == "beit_block"  # the method's default_masking, not SimMIM's
    trainer.train()
    # every micro-batch's mask went through the method's mask_inputs; the hook ran once per optimizer step
    assert len(dummy_method.masks) == 6
    assert all(mask.shape == (4, 64) and (mask.sum(dim=1) == 38).all() for mask in dummy_method.masks)
    assert [progress for _, progress in dummy_method.steps] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert all(hooked is model for hooked, _ in dummy_method.steps)


@pytest.mark.parametrize("upstream", ["mae", "simmim"])
def test_upstream_models_train_as_the_method_that_extends_them(tmp_path, upstream):
    # 0.625 x 64 = 40 patches, as many as 10 SimMIM squares of 2 x 2 patches (MAE's own count must agree)
    torch.manual_seed(0)
    if upstream == "mae":
        model, method = ViTMAEForPreTraining(ViTMAEConfig(**{**TINY_MAE, "mask_ratio": 0.625})), ViTMAEMTOMethod
    else:
        model, method = ViTForMaskedImageModeling(ViTConfig(**TINY_SIMMIM, mask_ratio=0.625)), SimMIMMTOMethod
    model.eval()
    no_mto = dict(mto_spa_weight=0.0, mto_e_weight=0.0, mto_r_weight=0.0)
    with pytest.raises(
        ValueError, match=f"{type(model).__name__} computes no MTO terms.*{method.model_class.__name__}"
    ):
        MTOTrainer(model=model, args=make_args(tmp_path))  # the default MTO weights
    trainer = MTOTrainer(model=model, args=make_args(tmp_path, **no_mto))
    assert trainer.method is method
    # the method's default masking: MAE draws its own (no generator), SimMIM gets block masks
    assert (trainer.mask_generator is None) == (upstream == "mae")
    trainer = MTOTrainer(model=model, args=make_args(tmp_path, masking="simmim_block", mask_patch_size=8, **no_mto))
    pixels = torch.randn(4, 3, 32, 32)
    torch.manual_seed(5)
    inputs = trainer._with_masks(model, {"pixel_values": pixels})
    torch.manual_seed(5)
    expected = trainer.mask_generator(4)
    if upstream == "mae":
        assert torch.equal(model(**inputs).mask.bool(), expected)
    else:
        assert torch.equal(inputs["bool_masked_pos"], expected)
    assert torch.isfinite(trainer.compute_loss(model, inputs))


def test_the_collators_device_step_normalises_8_bit_batches(tmp_path):
    from hf_mto.data import IMAGENET_MEAN, IMAGENET_STD, PixelCollator

    model = ViTMAEMTOForPreTraining(ViTMAEMTOConfig(**TINY_MAE))
    collator = PixelCollator(image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    trainer = MTOTrainer(model=model, args=make_args(tmp_path), data_collator=collator)
    pixels = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    inputs = trainer._prepare_inputs({"pixel_values": pixels})
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(inputs["pixel_values"], (pixels.float() / 255 - mean) / std)
