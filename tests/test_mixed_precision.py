"""Mixed precision and extreme magnitudes: MTO stays finite, float32 inside, and a non-finite term is named."""

import logging
import math

import pytest
import torch
from conftest import TINY_MAE, TINY_VIT

from hf_mto import (
    BeitMTOConfig,
    BeitMTOForMaskedImageModeling,
    ConMIMMTOConfig,
    ConMIMMTOForPreTraining,
    SimMIMMTOConfig,
    SimMIMMTOForMaskedImageModeling,
    ViTMAEMTOConfig,
    ViTMAEMTOForPreTraining,
)
from hf_mto.log_keys import MTO_TERMS
from hf_mto.trainer import MTOTrainer
from hf_mto.training_args import MTOTrainingArguments


def build(model_type):
    torch.manual_seed(0)
    if model_type == "mae":
        return ViTMAEMTOForPreTraining(ViTMAEMTOConfig(**TINY_MAE))
    if model_type == "beit":  # its k-means tokenizer is fitted on the training images when the trainer starts
        beit = dict(vocab_size=64, tokenizer_type="kmeans", tokenizer_image_size=32, tokenizer_image_std=1.0)
        return BeitMTOForMaskedImageModeling(BeitMTOConfig(**TINY_VIT, **beit))
    if model_type == "conmim":
        return ConMIMMTOForPreTraining(ConMIMMTOConfig(**TINY_VIT, projector_hidden_size=48, projector_size=16))
    return SimMIMMTOForMaskedImageModeling(SimMIMMTOConfig(**TINY_VIT, encoder_stride=4))


def images(n=24, tokenizer_view=False):
    """Examples of pixels, with BEiT's tokenizer view (here the same pixels) when ``tokenizer_view``."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(n, 3, 32, 32, generator=generator)
    views = {"tokenizer_pixel_values": pixels} if tokenizer_view else {}
    return [{name: value[index] for name, value in {"pixel_values": pixels, **views}.items()} for index in range(n)]


def trainer_for(model, tmp_path, **kwargs):
    settings = dict(per_device_train_batch_size=8, max_steps=3, logging_steps=1, save_strategy="no", use_cpu=True)
    args = MTOTrainingArguments(output_dir=str(tmp_path), report_to="none", mask_patch_size=8, **settings | kwargs)
    dataset = images(tokenizer_view=isinstance(model, BeitMTOForMaskedImageModeling))
    return MTOTrainer(model=model, args=args, train_dataset=dataset)


# the model's own loss as logged beside the total (ConMIM's is contrastive)
LOSS_COMPONENT = {
    "mae": "reconstruction_loss",
    "simmim": "reconstruction_loss",
    "beit": "reconstruction_loss",
    "conmim": "contrastive_loss",
}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("model_type", sorted(LOSS_COMPONENT))
def test_mixed_precision_runs_stay_finite(tmp_path, model_type, precision):
    trainer = trainer_for(build(model_type), tmp_path, **{precision: True})
    assert trainer.accelerator.mixed_precision == precision
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    for entry in logs:
        for key in ("loss", LOSS_COMPONENT[model_type], *(f"mto/{name}" for name in MTO_TERMS)):
            assert math.isfinite(entry[key]), (key, entry)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("model_type", sorted(LOSS_COMPONENT))
def test_mto_terms_are_float32_under_autocast(model_type, dtype):
    model = build(model_type)
    pixels = torch.randn(2, 3, 32, 32)
    mask = {"bool_masked_pos": torch.arange(64).expand(2, -1) % 2 == 0} if model_type != "mae" else {}
    with torch.autocast("cpu", dtype=dtype):
        out = model(pixel_values=pixels, use_mto=True, **mask)
    for name in MTO_TERMS:
        assert getattr(out, name).dtype == torch.float32, name
    assert out.heterogeneity.dtype == torch.float32


@pytest.mark.parametrize("model_type", sorted(LOSS_COMPONENT))
def test_extreme_hidden_state_magnitudes_give_finite_losses_and_gradients(model_type):
    model = build(model_type)
    with torch.no_grad():  # patch embeddings of magnitude ~1e4: affinities ~1e8 before the softmax
        projection = model.base_model.embeddings.patch_embeddings.projection
        projection.weight.mul_(1e4 / projection.weight.abs().mean())
    pixels = torch.randn(2, 3, 32, 32)
    mask = {"bool_masked_pos": torch.arange(64).expand(2, -1) % 2 == 0} if model_type != "mae" else {}
    # BEiT: its targets (the masked patches' visual-token ids) given, as its k-means tokenizer is not fitted here
    labels = {"labels": torch.randint(0, 64, (64,))} if model_type == "beit" else {}
    out = model(pixel_values=pixels, use_mto=True, **mask, **labels)
    total = out.loss + sum(getattr(out, name) for name in MTO_TERMS)
    total.backward()
    assert torch.isfinite(total)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_a_non_finite_term_is_named_in_the_log(tmp_path, caplog):
    model = build("mae")
    forward = model.forward

    def sparsity_goes_nan(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.sparsity_loss = out.sparsity_loss * float("nan")
        return out

    model.forward = sparsity_goes_nan
    trainer = trainer_for(model, tmp_path, max_steps=1)
    with caplog.at_level(logging.WARNING, logger="hf_mto.trainer"):
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(warnings) == 1
    # the first step's reconstruction was computed from healthy weights: only the culprit is named
    assert "train step 1: non-finite mto/sparsity_loss since the last log" in warnings[0]
    assert "reconstruction_loss" not in warnings[0]
