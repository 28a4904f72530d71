"""Evolved hierarchical masking from the model's own attention, inside the trainer step."""

import math

import pytest
import torch
from conftest import TINY_MAE, TINY_SIMMIM
from test_trainer import RandomImages, make_args
from transformers import ViTConfig, ViTModel

from hf_mto import SimMIMMTOConfig, SimMIMMTOForMaskedImageModeling, ViTMAEMTOConfig, ViTMAEMTOForPreTraining
from hf_mto.evolved import EvolvedMasking, encoder_similarity
from hf_mto.masking import evolved_depth
from hf_mto.trainer import MTOTrainer


def eager_reference(model, pixels, num_layers):
    """Similarity from an eager ViTModel with the same encoder weights and output_attentions (the slow way)."""
    config = ViTConfig(**TINY_SIMMIM, attn_implementation="eager")
    reference = ViTModel(config, add_pooling_layer=False).eval()
    missing, unexpected = reference.load_state_dict(model.vit.state_dict(), strict=False)
    assert set(unexpected) | set(missing) <= {"embeddings.mask_token"}  # only the mask token differs
    attentions = reference(pixels, output_attentions=True).attentions[:num_layers]
    mean = torch.stack([a[:, :, 1:, 1:].mean(dim=1) for a in attentions]).mean(dim=0)
    return (mean + mean.transpose(1, 2)) / 2


@pytest.mark.parametrize("model_type", ["mae", "simmim"])
def test_similarity_equals_eager_attention_of_the_unmasked_image(model_type):
    torch.manual_seed(0)
    if model_type == "mae":
        model = ViTMAEMTOForPreTraining(ViTMAEMTOConfig(**TINY_MAE))
    else:
        model = SimMIMMTOForMaskedImageModeling(SimMIMMTOConfig(**TINY_SIMMIM))
    pixels = torch.randn(2, 3, 32, 32)
    for num_layers in (1, 2):
        similarity = encoder_similarity(model, pixels, num_layers)
        assert similarity.shape == (2, 64, 64)
        assert torch.allclose(similarity, similarity.transpose(1, 2))
        assert torch.allclose(similarity, eager_reference(model, pixels, num_layers), atol=1e-6)
    assert model.config._attn_implementation == "sdpa"  # the training forward was not switched to eager
    with pytest.raises(ValueError, match="evolved_attention_layers.*3"):
        encoder_similarity(model, pixels, 3)


@pytest.mark.parametrize("model_type", ["mae", "simmim"])
def test_training_with_evolved_masks_logs_depth_and_height(tmp_path, model_type):
    torch.manual_seed(0)
    if model_type == "mae":
        model = ViTMAEMTOForPreTraining(ViTMAEMTOConfig(**TINY_MAE))
    else:
        model = SimMIMMTOForMaskedImageModeling(SimMIMMTOConfig(**TINY_SIMMIM))
    args = make_args(tmp_path, masking="evolved", max_steps=-1, num_train_epochs=2)
    trainer = MTOTrainer(model=model, args=args, train_dataset=RandomImages(32))
    assert trainer.mask_generator.num_layers == 1  # half of the 2 encoder blocks
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "evolved/depth" in entry]
    assert logged
    for entry in logged:
        assert 0 <= entry["evolved/depth"] <= entry["evolved/tree_height"]
        assert math.log2(64) <= entry["evolved/tree_height"] <= 63  # a binary tree over 64 leaves
    # epoch 0 of 2 is depth 0; the second epoch reaches floor(h / 2)
    assert logged[0]["evolved/depth"] == 0
    assert logged[-1]["evolved/depth"] > 0


def test_masks_reach_the_model_with_the_exact_count_and_the_scheduled_depth(tmp_path):
    torch.manual_seed(0)
    model = SimMIMMTOForMaskedImageModeling(SimMIMMTOConfig(**TINY_SIMMIM)).eval()
    trainer = MTOTrainer(model=model, args=make_args(tmp_path, masking="evolved", evolved_attention_layers=2))
    trainer.state.epoch, trainer.state.num_train_epochs = 3.4, 4  # as after resuming in the 4th of 4 epochs
    pixels = torch.randn(4, 3, 32, 32)
    _, out = trainer.compute_loss(model, {"pixel_values": pixels}, return_outputs=True)
    assert (out.mask.sum(dim=1) == round(0.6 * 64)).all()
    masking = EvolvedMasking(0.6, 2)
    torch.manual_seed(1)
    _, depth, height = masking(model, pixels, epoch=3, total_epochs=4)
    assert torch.equal(depth, torch.div(height * 3, 4, rounding_mode="floor"))
    assert torch.equal(depth, evolved_depth(height, 3, 4))
    recorded = trainer._metric_sums["eval"]["evolved/depth"]
    assert recorded.item() == pytest.approx(depth.float().mean().item())


def test_bad_evolved_settings_raise_clear_errors(tmp_path):
    model = SimMIMMTOForMaskedImageModeling(SimMIMMTOConfig(**TINY_SIMMIM))
    with pytest.raises(ValueError, match=r"evolved_attention_layers must be in \[1, 2\].*5"):
        MTOTrainer(model=model, args=make_args(tmp_path, masking="evolved", evolved_attention_layers=5))
    with pytest.raises(ValueError, match="0.8, 0.2"):
        make_args(tmp_path, masking="evolved", evolved_f0=0.8, evolved_f1=0.2)
    with pytest.raises(ValueError, match="mask_ratio"):
        EvolvedMasking(1.2, 1)
    # MAE masks N - int(N * 0.4) = 39 patches, evolved masking round(0.6 * 64) = 38: refused before training
    mae = ViTMAEMTOForPreTraining(ViTMAEMTOConfig(**{**TINY_MAE, "mask_ratio": 0.6}))
    with pytest.raises(ValueError, match="evolved masking masks 38 of 64.*masks 39"):
        MTOTrainer(model=mae, args=make_args(tmp_path, masking="evolved"))
