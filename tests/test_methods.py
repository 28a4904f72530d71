"""The method declarations the coming methods need (several MTO stacks, several views of an image, targets computed in
the step), followed by generic code: the data, the trainer, the model card and the analysis."""

import datasets
import numpy as np
import pytest
import torch
from conftest import TINY_SIMMIM
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoModelForMaskedImageModeling

from hf_mto.analysis import analyze_heterogeneity
from hf_mto.data import IMAGENET_MEAN, IMAGENET_STD, PixelCollator, apply_transform
from hf_mto.methods import PreTrainingMethod, model_types, register_method
from hf_mto.model_card import render_model_card
from hf_mto.trainer import MTOTrainer
from hf_mto.training_args import MTOTrainingArguments


def images(count: int) -> datasets.Dataset:
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(count)]
    return datasets.Dataset.from_dict({"image": pictures}, features=datasets.Features({"image": datasets.Image()}))


def test_a_transform_with_several_views_gives_every_view_to_the_batch(two_view_method):
    transform = two_view_method.pretraining_transform(32, IMAGENET_MEAN, IMAGENET_STD)
    batch = PixelCollator()([apply_transform(images(3), transform)[i] for i in range(3)])
    assert set(batch) == {"pixel_values", "second_pixel_values"}
    assert batch["pixel_values"].shape == batch["second_pixel_values"].shape == (3, 3, 32, 32)
    torch.testing.assert_close(batch["second_pixel_values"], batch["pixel_values"].flip(-2))


def test_the_trainer_weights_and_logs_every_mto_stack_and_gives_every_view(tmp_path, two_view_method):
    torch.manual_seed(0)
    model = two_view_method.model_class(two_view_method.config_class(**TINY_SIMMIM))
    transform = two_view_method.pretraining_transform(32, IMAGENET_MEAN, IMAGENET_STD)
    args = MTOTrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        mto_spa_weight=0.5,
        mto_e_weight=0.25,
        mto_r_weight=2.0,
        mask_patch_size=8,  # SimMIM squares of 2 x 2 patches at 32 px
    )
    data = apply_transform(images(8), transform)
    evaluation = apply_transform(images(4), two_view_method.evaluation_transform(32, IMAGENET_MEAN, IMAGENET_STD))
    trainer = MTOTrainer(
        model=model, args=args, train_dataset=data, eval_dataset=evaluation, data_collator=PixelCollator()
    )
    trainer.train()
    # the second view reached the model
    seen = two_view_method.inputs[0]
    torch.testing.assert_close(seen["second_pixel_values"], seen["pixel_values"].flip(-2))
    logged = trainer.state.log_history[0]
    for stack in ("first", "second"):
        for name in ("sparsity_loss", "singularity_loss", "ranking_loss", "heterogeneity/layer_0"):
            assert f"mto/{stack}/{name}" in logged
    assert not any(key in logged for key in ("mto/sparsity_loss", "mto/heterogeneity/layer_0"))
    # each stack's own values (the views differ), and the method's loss components instead of a reconstruction loss
    assert logged["mto/first/sparsity_loss"] != pytest.approx(logged["mto/second/sparsity_loss"])
    assert {"first_loss", "second_loss"} <= set(logged) and "reconstruction_loss" not in logged
    # evaluation gives the model both views too, and logs per stack
    metrics = trainer.evaluate()
    assert "eval_mto/second/heterogeneity/layer_0" in metrics and "eval_second_loss" in metrics
    assert len(two_view_method.inputs) == 2 + 1  # 2 training steps, 1 evaluation batch

    # the loss: the model's own plus each stack's terms, weighted alike
    model.eval()
    batch = PixelCollator()([data[i] for i in range(4)])
    batch["bool_masked_pos"] = torch.rand(4, 64, generator=torch.Generator().manual_seed(1)) < 0.5
    loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    expected = outputs.loss
    for stack in (outputs.first_mto, outputs.second_mto):
        expected = expected + 0.5 * stack.sparsity_loss + 0.25 * stack.singularity_loss + 2.0 * stack.ranking_loss
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert outputs.first_mto.sparsity_loss.item() != pytest.approx(outputs.second_mto.sparsity_loss.item())

    card = render_model_card(model.config, args, trainer.state)
    for stack in ("first", "second"):
        assert f"`mto/{stack}/sparsity_loss`" in card and f"| {stack} 0 |" in card


def test_the_analysis_measures_each_mto_stack(two_view_method):
    # "dot": at the tiny width the scaled affinity is near uniform, so every stack would measure about log(V)
    config = two_view_method.config_class(**TINY_SIMMIM, mto_affinity="dot")
    model = two_view_method.model_class(config).eval()
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    first = analyze_heterogeneity(model, pixels, mask_patch_size=8)
    second = analyze_heterogeneity(model, pixels, mask_patch_size=8, stack="second")
    assert (first.stack, second.stack) == ("first", "second")
    # the second stack is the first one's measurement of the flipped images
    flipped = analyze_heterogeneity(model, pixels.flip(-2), mask_patch_size=8, stack="first")
    assert second.heterogeneity == pytest.approx(flipped.heterogeneity)
    assert second.heterogeneity != pytest.approx(first.heterogeneity)
    with pytest.raises(ValueError, match=r"stack 'third' is not an MTO stack of TwoViewModel.*\['first', 'second'\]"):
        analyze_heterogeneity(model, pixels, stack="third")


def test_views_of_an_unreadable_image_are_dropped_with_it_and_labels_pass_on(two_view_method):
    transform = two_view_method.pretraining_transform(32, IMAGENET_MEAN, IMAGENET_STD)
    data = images(3).add_column("label", [0, 1, 2]).cast_column("image", datasets.Image(decode=False))
    data = data.map(lambda example, i: {"image": {"bytes": b"not an image", "path": None}} if i == 1 else example,
                    with_indices=True)  # fmt: skip
    examples = [apply_transform(data, transform)[i] for i in range(3)]
    assert examples[1]["pixel_values"] is None  # how the collator tells it
    batch = PixelCollator(include_labels=True)(examples)
    assert set(batch) == {"pixel_values", "second_pixel_values", "labels"}
    assert batch["labels"].tolist() == [0, 2] and batch["second_pixel_values"].shape == (2, 3, 32, 32)


def test_a_dict_of_views_without_pixel_values_is_refused_naming_its_keys():
    def transform(image):
        return {"student": torch.zeros(3, 32, 32)}

    with pytest.raises(ValueError, match=r"must hold 'pixel_values'; it holds \['student'\]"):
        apply_transform(images(1), transform)[0]


def test_registering_a_method_registers_its_auto_classes(two_view_method):
    config = AutoConfig.for_model("two_view_mim", **TINY_SIMMIM)
    assert type(config) is two_view_method.config_class
    assert type(AutoModel.from_config(config)) is two_view_method.base_model_class
    assert type(AutoModelForMaskedImageModeling.from_config(config)) is two_view_method.model_class


def test_the_method_fixtures_leave_no_registration_behind():
    # runs after the tests above (file order): their methods and Auto classes are gone
    assert "two_view_mim" not in model_types()
    with pytest.raises(ValueError):
        AutoConfig.for_model("two_view_mim")


def test_a_method_missing_a_declaration_is_refused_naming_it():
    class Incomplete(PreTrainingMethod):
        name = "Incomplete"

    with pytest.raises(TypeError, match="Incomplete does not declare config_class, model_class, base_model_class"):
        register_method(Incomplete)
