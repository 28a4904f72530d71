"""Evolved hierarchical masking from the model's own attention, inside the trainer step."""

import math

import pytest
import torch
from conftest import TINY_MAE, TINY_SIMMIM
from test_trainer import RandomImages, make_args
from transformers import TrainerCallback, TrainerState, ViTConfig, ViTModel

from hf_mto import SimMIMMTOConfig, SimMIMMTOForMaskedImageModeling, ViTMAEMTOConfig, ViTMAEMTOForPreTraining
from hf_mto.evolved import EvolvedMasking, encoder_similarity
from hf_mto.masking import evolved_depth
from hf_mto.trainer import MTOTrainer, training_progress

# A binary merge tree over the 64 patches of a tiny image is at least log2(64) = 6 levels high.
MIN_TINY_HEIGHT = 6


def eager_reference(model, pixels, attention_layers):
    """Similarity from an eager ViTModel with the same encoder weights and output_attentions (the slow way)."""
    config = ViTConfig(**TINY_SIMMIM, attn_implementation="eager")
    reference = ViTModel(config, add_pooling_layer=False).eval()
    missing, unexpected = reference.load_state_dict(model.vit.state_dict(), strict=False)
    assert set(unexpected) | set(missing) <= {"embeddings.mask_token"}  # only the mask token differs
    attentions = reference(pixels, output_attentions=True).attentions[:attention_layers]
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
    for attention_layers in (1, 2):
        similarity = encoder_similarity(model, pixels, attention_layers)
        assert similarity.shape == (2, 64, 64)
        assert torch.allclose(similarity, similarity.transpose(1, 2))
        assert torch.allclose(similarity, eager_reference(model, pixels, attention_layers), atol=1e-6)
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
    args = make_args(tmp_path, masking="evolved", max_steps=-1, num_train_epochs=2, logging_steps=1)
    trainer = MTOTrainer(model=model, args=args, train_dataset=RandomImages(32))
    assert trainer.mask_generator.attention_layers == 1  # half of the 2 encoder blocks
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "evolved/depth" in entry]
    assert logged
    for entry in logged:
        assert 0 <= entry["evolved/depth"] <= entry["evolved/tree_height"]
        assert MIN_TINY_HEIGHT <= entry["evolved/tree_height"] <= 63  # a binary tree over 64 leaves
    # the first step (t = 0) is depth 0; the last (t = 7/8) reaches floor(7h / 8)
    assert len(logged) == 8
    assert logged[0]["evolved/depth"] == 0
    assert logged[-1]["evolved/depth"] >= math.floor(MIN_TINY_HEIGHT * 7 / 8)


def test_masks_reach_the_model_with_the_exact_count_and_the_scheduled_depth(tmp_path):
    torch.manual_seed(0)
    model = SimMIMMTOForMaskedImageModeling(SimMIMMTOConfig(**TINY_SIMMIM)).eval()
    trainer = MTOTrainer(model=model, args=make_args(tmp_path, masking="evolved", evolved_attention_layers=2))
    trainer.state.global_step, trainer.state.max_steps = 17, 20  # as after resuming 17 steps into a 20-step run
    pixels = torch.randn(4, 3, 32, 32)
    _, out = trainer.compute_loss(model, {"pixel_values": pixels}, return_outputs=True)
    assert (out.mask.sum(dim=1) == round(0.6 * 64)).all()
    masking = EvolvedMasking(0.6, 64, 2)
    torch.manual_seed(1)
    _, depth, height = masking(model, pixels, progress=0.85)
    assert torch.equal(depth, torch.div(height * 17, 20, rounding_mode="floor"))
    assert torch.equal(depth, evolved_depth(height, 0.85))
    recorded = trainer._metric_sums["eval"]["evolved/depth"]
    assert recorded.item() == pytest.approx(depth.float().mean().item())


def test_training_progress_is_the_fraction_of_steps_done():
    assert training_progress(TrainerState()) == 0.0  # before training: max_steps is still 0
    assert training_progress(TrainerState(global_step=0, max_steps=8)) == 0.0
    assert training_progress(TrainerState(global_step=3, max_steps=8)) == 3 / 8
    assert training_progress(TrainerState(global_step=8, max_steps=8)) == 1.0  # an evaluation after the last step
    assert training_progress(TrainerState(global_step=12, max_steps=8)) == 1.0  # a longer run's checkpoint


class RecordProgress(TrainerCallback):
    """At the start of every optimizer step, before its batches are masked: the training progress t and the
    Trainer's fractional epoch over its total epochs."""

    def __init__(self):
        self.progress, self.epoch_fraction = [], []

    def on_step_begin(self, args, state, control, **kwargs):
        self.progress.append(training_progress(state))
        self.epoch_fraction.append(state.epoch / state.num_train_epochs)


def test_a_one_epoch_run_sweeps_the_depth_schedule_and_resumes_mid_epoch_exactly(tmp_path):
    """One epoch of 8 steps: the depth follows t = (step - 1) / 8 within the epoch (the old per-epoch schedule stayed
    at depth 0 all run), and a run resumed from the checkpoint at step 3 sees the same depths, heights and losses as
    the uninterrupted one."""
    settings = dict(masking="evolved", max_steps=-1, num_train_epochs=1, logging_steps=1)
    settings.update(save_strategy="steps", save_steps=3)

    def train(output_dir, resume_from_checkpoint=None):
        torch.manual_seed(0 if resume_from_checkpoint is None else 1)  # resuming must not depend on the init
        model = ViTMAEMTOForPreTraining(ViTMAEMTOConfig(**TINY_MAE))
        args = make_args(output_dir, **settings)
        recorder = RecordProgress()
        trainer = MTOTrainer(model=model, args=args, train_dataset=RandomImages(64), callbacks=[recorder])
        trainer.train(resume_from_checkpoint=resume_from_checkpoint)
        logs = {entry["step"]: entry for entry in trainer.state.log_history if "evolved/depth" in entry}
        return logs, recorder

    reference, recorder = train(tmp_path / "reference")
    assert sorted(reference) == list(range(1, 9))
    assert recorder.progress == [step / 8 for step in range(8)]
    # a run of whole epochs: t is the Trainer's fractional epoch over the total epochs, as DESIGN.md states it
    assert recorder.progress == recorder.epoch_fraction
    for step, entry in reference.items():
        t = (step - 1) / 8  # the step's masks are drawn before its optimizer step is counted
        # every image's depth is floor(h_i * t) with h_i >= 6, so the batch mean lies in [floor(6 t), mean(h) t]
        assert math.floor(MIN_TINY_HEIGHT * t) <= entry["evolved/depth"] <= entry["evolved/tree_height"] * t + 1e-6
    assert reference[1]["evolved/depth"] == 0 < reference[4]["evolved/depth"] < reference[8]["evolved/depth"]

    mid_epoch = tmp_path / "reference" / "checkpoint-3"
    resumed, recorder = train(tmp_path / "resumed", resume_from_checkpoint=str(mid_epoch))
    assert recorder.progress == [step / 8 for step in range(3, 8)]
    for step in range(4, 9):
        for key in ("loss", "evolved/depth", "evolved/tree_height"):
            assert resumed[step][key] == pytest.approx(reference[step][key], rel=1e-5), (step, key)


def test_a_max_steps_run_sweeps_the_whole_schedule(tmp_path):
    """6 steps of 4-step epochs: the Trainer counts 2 epochs, so the fractional epoch over the total would end the
    schedule at 1.25 / 2; the training progress reaches 5 / 6."""
    torch.manual_seed(0)
    model = ViTMAEMTOForPreTraining(ViTMAEMTOConfig(**TINY_MAE))
    args = make_args(tmp_path, max_steps=6, mto_spa_weight=0.0, mto_e_weight=0.0, mto_r_weight=0.0)
    recorder = RecordProgress()
    trainer = MTOTrainer(model=model, args=args, train_dataset=RandomImages(32), callbacks=[recorder])
    trainer.train()
    assert trainer.state.num_train_epochs == 2
    assert recorder.progress == [step / 6 for step in range(6)]
    assert recorder.epoch_fraction[-1] == 1.25 / 2


def test_bad_evolved_settings_raise_clear_errors(tmp_path):
    model = SimMIMMTOForMaskedImageModeling(SimMIMMTOConfig(**TINY_SIMMIM))
    with pytest.raises(ValueError, match=r"evolved_attention_layers must be in \[1, 2\].*5"):
        MTOTrainer(model=model, args=make_args(tmp_path, masking="evolved", evolved_attention_layers=5))
    with pytest.raises(ValueError, match="0.8, 0.2"):
        make_args(tmp_path, masking="evolved", evolved_f0=0.8, evolved_f1=0.2)
    with pytest.raises(ValueError, match="mask_ratio"):
        EvolvedMasking(1.2, 64, 1)
    # MAE masks N - int(N * 0.4) = 39 patches, evolved masking round(0.6 * 64) = 38: refused before training
    mae = ViTMAEMTOForPreTraining(ViTMAEMTOConfig(**{**TINY_MAE, "mask_ratio": 0.6}))
    with pytest.raises(ValueError, match="evolved masking: 38 of 64.*masks 39"):
        MTOTrainer(model=mae, args=make_args(tmp_path, masking="evolved"))
