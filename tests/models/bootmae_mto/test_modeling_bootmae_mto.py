"""BootMAEMTOConfig / BootMAEMTOForPreTraining / BootMAEMTOModel (hf_mto/models/bootmae_mto): transformers' generic
model tests, MTO on and off (`BootMAEMTOModelTester`, see tests/conformance.py; there is no upstream BootMAE to run as
a reference), then the loss terms, the MTO terms of both decoders, the momentum encoder's EMA step (by hand and through
`MTOTrainer` with gradient accumulation), the initialisation, loading, export, analysis, the recipe preset and config
validation, at the suite's tiny size.
"""

import json
import math
import subprocess
import sys
import textwrap
import unittest
from pathlib import Path

import pytest
import torch
from conformance import ConformanceTest, NoiseMaskedModelTester
from conftest import TINY_MAE, run_without_hf_mto
from transformers import AutoConfig, AutoModel, AutoModelForPreTraining
from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding

import hf_mto
from hf_mto import BootMAEMTOConfig, BootMAEMTOForPreTraining, BootMAEMTOMethod, BootMAEMTOModel, methods, mto
from hf_mto.models.bootmae_mto import modeling_bootmae_mto

ROOT = Path(__file__).resolve().parents[3]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


class BootMAEMTOModelTester(NoiseMaskedModelTester):
    """The ViTMAE tester shape with the feature decoder as deep as the encoder too, and a fixed noise."""

    def config_kwargs(self) -> dict:
        return dict(super().config_kwargs(), feature_decoder_num_hidden_layers=self.num_hidden_layers)


class BootMAEMTOOnTest(ConformanceTest, unittest.TestCase):
    all_model_classes = (BootMAEMTOModel, BootMAEMTOForPreTraining)
    model_tester_class = BootMAEMTOModelTester
    config_class = BootMAEMTOConfig
    config_overrides = {"use_mto": True}


@pytest.mark.slow  # the generic suite again with MTO off (the On suite runs by default): in the slow set
class BootMAEMTOOffTest(ConformanceTest, unittest.TestCase):
    all_model_classes = (BootMAEMTOModel, BootMAEMTOForPreTraining)
    model_tester_class = BootMAEMTOModelTester
    config_class = BootMAEMTOConfig
    config_overrides = {"use_mto": False}


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return BootMAEMTOForPreTraining(BootMAEMTOConfig(**{**TINY_MAE, **overrides}))


def batch(seed=0, size=3):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 3, 32, 32, generator=generator), torch.rand(size, 64, generator=generator)


def capture_states(decoder):
    """Hooks that record H^0 (input of the first block) and H^l (output of block l) of a decoder."""
    captured = []
    decoder.layers[0].register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    for layer in decoder.layers:
        layer.register_forward_hook(lambda m, args, out: captured.append(out))
    return captured


# ---------------------------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight_mask", [True, False])
def test_loss_terms_by_hand(weight_mask):
    model = make_model(weight_mask=weight_mask).eval()
    pixels, noise = batch()
    out = model(pixels, noise=noise, use_mto=False)
    mask = out.mask
    assert mask.sum(dim=1).eq(48).all()  # int(64 * 0.25) = 16 kept
    # per patch, per channel normalised target (biased variance, eps 1e-5 inside the root)
    patches = pixels.unfold(2, 4, 4).unfold(3, 4, 4)  # [B, C, 8, 8, 4, 4]
    patches = patches.permute(0, 2, 3, 4, 5, 1).reshape(3, 64, 16, 3)  # [B, N, P*P, C]
    target = (patches - patches.mean(2, keepdim=True)) / (patches.var(2, unbiased=False, keepdim=True) + 1e-5).sqrt()
    if weight_mask:
        grid = mask.view(3, 8, 8)
        padded = torch.nn.functional.pad(grid, (1, 1, 1, 1))
        count = sum(padded[:, i : i + 8, j : j + 8] for i in range(3) for j in range(3))
        weights = (grid * (1 + count / 9)).view(3, 64)
    else:
        weights = mask
    pixel_err = ((out.logits - target.reshape(3, 64, 48)) ** 2).mean(-1)
    pixel_loss = (pixel_err * weights).sum() / mask.sum()
    torch.testing.assert_close(out.pixel_loss, pixel_loss)
    # feature target: the momentum encoder's last block (before its final norm) on the whole image
    with torch.no_grad():
        hidden = (
            model.teacher.embeddings.patch_embeddings(pixels) + model.teacher.embeddings.position_embeddings[:, 1:]
        )
        cls = model.teacher.embeddings.cls_token.expand(3, -1, -1)
        hidden = torch.cat([cls, hidden], dim=1)
        for layer in model.teacher.layers:
            hidden = layer(hidden)
    ln = torch.nn.functional.layer_norm
    feature_err = ((ln(out.feature_prediction, (32,), eps=1e-6) - ln(hidden[:, 1:], (32,), eps=1e-6)) ** 2).mean(-1)
    torch.testing.assert_close(out.feature_loss, (feature_err * weights).sum() / mask.sum())
    # the ramp: 0 at the start, linear over the first quarter of training, then the full weight
    for progress, weight in ((0.0, 0.0), (0.1, 0.4), (0.25, 1.0), (1.0, 1.0)):
        model.training_progress.fill_(progress)
        out = model(pixels, noise=noise, use_mto=False)
        assert out.feature_weight.item() == pytest.approx(weight)
        torch.testing.assert_close(out.loss, out.pixel_loss + weight * out.feature_loss)


def test_raw_pixel_target_without_norm_pix_loss():
    model = make_model(norm_pix_loss=False, weight_mask=False).eval()
    pixels, noise = batch()
    out = model(pixels, noise=noise, use_mto=False)
    expected = (((out.logits - model.patchify(pixels)) ** 2).mean(-1) * out.mask).sum() / out.mask.sum()
    torch.testing.assert_close(out.pixel_loss, expected)


# ---------------------------------------------------------------------------------------------------------------------
# MTO
# ---------------------------------------------------------------------------------------------------------------------


def test_mto_terms_of_both_decoders_equal_the_general_path():
    model = make_model().eval()
    pixels, noise = batch(size=4)
    captured = {name: capture_states(getattr(model, name)) for name in ("pixel_decoder", "feature_decoder")}
    out = model(pixels, noise=noise)
    mask = out.mask.bool()
    for name, states in captured.items():
        terms = getattr(out, f"{name}_mto")
        # the blocks see CLS, visible, masked: back in patch order, the general N x N path must agree
        index = out.ids_restore.unsqueeze(-1).expand(-1, -1, states[0].shape[-1])
        expected = mto.mto_terms([torch.gather(state[:, 1:], 1, index) for state in states], mask)
        assert terms.heterogeneity.shape == (4, 3)
        torch.testing.assert_close(terms.heterogeneity, expected.heterogeneity)
        torch.testing.assert_close(terms.sparsity_loss, expected.sparsity_loss)
        torch.testing.assert_close(terms.singularity_loss, expected.singularity_loss)
        torch.testing.assert_close(terms.ranking_loss, expected.ranking_loss)
        assert (terms.heterogeneity > 0).all() and (terms.heterogeneity <= math.log(16) + 1e-5).all()
    assert not torch.equal(out.pixel_decoder_mto.heterogeneity, out.feature_decoder_mto.heterogeneity)


@pytest.mark.parametrize("name", ["pixel_decoder", "feature_decoder"])
def test_h0_is_the_mask_tokens_plus_positions_and_the_projected_visible_tokens(name):
    model = make_model().eval()
    decoder = getattr(model, name)
    pixels, noise = batch()
    captured = capture_states(decoder)
    out = model(pixels, noise=noise)
    encoded = model.vit(pixels, noise=noise)
    h0 = captured[0]
    torch.testing.assert_close(h0[:, :17], decoder.decoder_embed(encoded.last_hidden_state))
    masked_ids = torch.argsort(out.ids_restore, dim=1)[:, 16:]
    # the pixel decoder's own sin-cos table; the feature decoder uses the encoder's (official)
    own = decoder.position_embeddings if name == "pixel_decoder" else model.vit.embeddings.position_embeddings
    torch.testing.assert_close(h0[:, 17:], decoder.mask_token + own[0, 1:][masked_ids])


def test_each_decoder_cross_attends_to_its_encoder_block():
    # pixel decoder: the first block's output; feature decoder: the last block's, before the final norm (official)
    model = make_model().eval()
    pixels, noise = batch()
    memories = {}
    for name in ("pixel_decoder", "feature_decoder"):
        layer = getattr(model, name).layers[0]
        layer.layernorm_memory.register_forward_hook(
            lambda m, args, out, name=name: memories.setdefault(name, args[0])
        )
    with torch.no_grad():
        model(pixels, noise=noise)
        encoded = model.vit(pixels, noise=noise, output_hidden_states=True)
    torch.testing.assert_close(memories["pixel_decoder"], encoded.hidden_states[1])
    torch.testing.assert_close(memories["feature_decoder"], encoded.hidden_states[-1])
    assert not torch.allclose(encoded.hidden_states[-1], encoded.last_hidden_state)  # the final norm is left out


def test_attention_implementation_reaches_both_decoders():
    model = make_model().eval()
    pixels, noise = batch()
    with torch.no_grad():
        sdpa = model(pixels, noise=noise)
        model.set_attn_implementation("eager")
        eager = model(pixels, noise=noise)
    for name in ("pixel_decoder", "feature_decoder"):
        decoder = getattr(model, name)
        assert decoder.layers[0].cross_attention.config._attn_implementation == "eager"
    torch.testing.assert_close(eager.loss, sdpa.loss)


def test_the_teacher_refuses_an_ema_step_in_low_precision():
    # (1 - 0.99999) x a change is below bf16's resolution: the teacher would silently never move
    model = make_model().to(torch.bfloat16)
    with pytest.raises(ValueError, match="momentum encoder must stay float32.*bfloat16"):
        model.update_teacher(0.5)


def test_mto_off_does_no_mto_work(monkeypatch):
    model = make_model(use_mto=False)

    def forbidden(*args, **kwargs):
        raise AssertionError("MTO terms computed although MTO is off")

    monkeypatch.setattr(modeling_bootmae_mto, "mto_terms_visible_first", forbidden)
    pixels, noise = batch()
    out = model(pixels, noise=noise)
    assert out.pixel_decoder_mto is None and out.feature_decoder_mto is None
    with pytest.raises(AssertionError, match="MTO terms computed"):
        model(pixels, noise=noise, use_mto=True)


def test_mto_terms_have_gradients_to_both_mask_tokens():
    model = make_model()
    pixels, noise = batch()
    out = model(pixels, noise=noise)
    total = sum(
        terms.sparsity_loss + terms.singularity_loss + terms.ranking_loss
        for terms in (out.pixel_decoder_mto, out.feature_decoder_mto)
    )
    total.backward()
    assert model.pixel_decoder.mask_token.grad.abs().sum() > 0
    assert model.feature_decoder.mask_token.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.teacher.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# Momentum encoder
# ---------------------------------------------------------------------------------------------------------------------


def test_teacher_starts_as_the_encoder_and_is_frozen():
    model = make_model()
    student = model.vit.state_dict()
    teacher = model.teacher.state_dict()
    assert student.keys() == teacher.keys()
    assert all(torch.equal(student[k], teacher[k]) for k in student)
    assert not any(p.requires_grad for p in model.teacher.parameters())
    model.train()
    assert model.training and not model.teacher.training  # the momentum encoder always runs in eval mode
    pixels, noise = batch()
    model(pixels, noise=noise).loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())


@pytest.mark.parametrize(
    "progress, decay",
    [(0.0, 0.999), (0.0625, 0.99945), (0.125, 0.9999), (0.3125, 0.999945), (0.5, 0.99999), (0.9, 0.99999)],
)
def test_update_teacher_is_one_ema_step_with_the_scheduled_decay(progress, decay):
    model = make_model()
    with torch.no_grad():  # move the encoder away from the teacher
        for p in model.vit.parameters():
            p.add_(torch.randn_like(p))
    old = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    student = model.vit.state_dict()
    assert modeling_bootmae_mto.momentum_decay(model.config.momentum_schedule, progress) == pytest.approx(decay)
    assert model.update_teacher(progress) == pytest.approx(decay)
    for key, value in model.teacher.state_dict().items():
        torch.testing.assert_close(value, decay * old[key] + (1 - decay) * student[key], rtol=0, atol=1e-6)
    assert model.training_progress.item() == pytest.approx(progress)
    assert not model.teacher.embeddings.position_embeddings.requires_grad


def test_trainer_moves_the_teacher_once_per_optimizer_step_with_gradient_accumulation(tmp_path):
    from conftest import RandomImages

    from hf_mto.trainer import MTOTrainer
    from hf_mto.training_args import MTOTrainingArguments

    model = make_model()
    steps = []
    original = model.update_teacher
    model.update_teacher = lambda progress: steps.append(progress) or original(progress)
    args = MTOTrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        mto_spa_weight=0.1,
        mto_e_weight=0.1,
        mto_r_weight=0.1,
    )
    trainer = MTOTrainer(model=model, args=args, train_dataset=RandomImages(32))
    assert trainer.mask_generator.strategy == "bootmae_block"  # the method's default
    trainer.train()
    assert steps == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert model.training_progress.item() == pytest.approx(1.0)
    logs = [entry for entry in trainer.state.log_history if "reconstruction_loss" in entry]
    assert len(logs) == 3
    for stack in ("pixel_decoder", "feature_decoder"):
        assert f"mto/{stack}/sparsity_loss" in logs[0]
        assert f"mto/{stack}/heterogeneity/layer_0" in logs[0]


def test_resume_from_a_checkpoint_continues_the_uninterrupted_run_exactly(tmp_path):
    """4 steps in one go, and 2 + 2 through checkpoint-2 into a model built from another seed: the same student,
    momentum encoder and progress (the checkpoint holds the teacher and `training_progress`; the Trainer restores the
    data order and the RNG the masks are drawn from)."""
    from conftest import RandomImages

    from hf_mto.trainer import MTOTrainer
    from hf_mto.training_args import MTOTrainingArguments

    def trainer(model, output_dir):
        args = MTOTrainingArguments(
            output_dir=str(output_dir),
            per_device_train_batch_size=4,
            max_steps=4,
            save_strategy="steps",
            save_steps=2,
            report_to="none",
            use_cpu=True,
            seed=0,
            dataloader_num_workers=0,
            mto_spa_weight=0.1,
            mto_e_weight=0.1,
            mto_r_weight=0.1,
        )
        return MTOTrainer(model=model, args=args, train_dataset=RandomImages(32))

    reference = make_model()
    trainer(reference, tmp_path / "reference").train()
    checkpoint = tmp_path / "reference" / "checkpoint-2"
    resumed = make_model(seed=1)
    resumed_trainer = trainer(resumed, tmp_path / "resumed")
    resumed_trainer.train(resume_from_checkpoint=str(checkpoint))
    assert resumed_trainer.state.global_step == 4
    assert resumed.training_progress.item() == reference.training_progress.item() == 1.0
    expected, got = reference.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    # the momentum encoder moved between the checkpoint and the end, and stayed frozen through the resume
    saved = AutoModelForPreTraining.from_pretrained(checkpoint)
    assert not torch.equal(saved.teacher.layers[0].mlp.fc1.weight, resumed.teacher.layers[0].mlp.fc1.weight)
    assert saved.training_progress.item() == 0.5
    assert not any(p.requires_grad for p in resumed.teacher.parameters())
    assert not resumed.teacher.training and resumed.training


@pytest.mark.slow  # two processes (torchrun, gloo on CPU): ~30 s on 2 cores
def test_ddp_processes_end_with_identical_moved_teachers(tmp_path):
    """Each process trains on its own shard; the teacher is no DDP parameter (frozen) but follows the averaged
    student, so every process must end with the same momentum encoder, moved from its start, at progress 1."""
    from test_distributed import torchrun

    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, torch
            from conftest import TINY_MAE
            from hf_mto import BootMAEMTOConfig, BootMAEMTOForPreTraining
            from hf_mto.trainer import MTOTrainer
            from hf_mto.training_args import MTOTrainingArguments

            torch.manual_seed(0)
            model = BootMAEMTOForPreTraining(BootMAEMTOConfig(**TINY_MAE))
            images = [{{"pixel_values": torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(i))}}
                      for i in range(48)]  # 3 steps x 2 accumulated batches x 4 images x 2 processes
            args = MTOTrainingArguments(
                output_dir={str(tmp_path)!r}, report_to="none", per_device_train_batch_size=4,
                gradient_accumulation_steps=2, max_steps=3, save_strategy="no", seed=0,
                mto_spa_weight=0.1, mto_e_weight=0.1, mto_r_weight=0.1,
            )
            trainer = MTOTrainer(model=model, args=args, train_dataset=images)
            initial = {{k: v.clone() for k, v in model.teacher.state_dict().items()}}
            first_batch = next(iter(trainer.get_train_dataloader()))["pixel_values"]
            trainer.train()
            rank = args.process_index
            torch.save({{"initial": initial, "teacher": model.teacher.state_dict(), "state": model.state_dict(),
                         "first_batch": first_batch}}, {str(tmp_path)!r} + f"/rank{{rank}}.pt")
            json.dump({{"world": args.world_size, "progress": model.training_progress.item(),
                       "steps": trainer.state.global_step}}, open({str(tmp_path)!r} + f"/rank{{rank}}.json", "w"))
            trainer.accelerator.end_training()
            """
        )
    )
    torchrun([str(script)], cwd=ROOT / "tests")
    saved = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert records[0] == records[1] == {"world": 2, "progress": 1.0, "steps": 3}
    assert not torch.equal(saved[0]["first_batch"], saved[1]["first_batch"])  # the processes saw different images
    teachers = [entry["teacher"] for entry in saved]
    assert teachers[0].keys() == teachers[1].keys() == saved[0]["initial"].keys()
    for key in teachers[0]:
        assert torch.equal(teachers[0][key], teachers[1][key]), key
    moved = [key for key in teachers[0] if not torch.equal(teachers[0][key], saved[0]["initial"][key])]
    assert "layers.0.mlp.fc1.weight" in moved and "embeddings.patch_embeddings.projection.weight" in moved
    for key in saved[0]["state"]:  # the students (and everything else) agree too
        assert torch.equal(saved[0]["state"][key], saved[1]["state"][key]), key


# ---------------------------------------------------------------------------------------------------------------------
# Initialisation, loading, validation
# ---------------------------------------------------------------------------------------------------------------------


def test_initialisation_from_config_is_official_bootmae():
    model = make_model()
    table = modeling_bootmae_mto.bootmae_sincos_position_embedding(64, 32)
    # no half swap: transformers' table as it is (MoCo v3 / BootMAE layout)
    torch.testing.assert_close(table[0], build_2d_sinusoidal_position_embedding(8, 8, 32, cls_token=True))
    assert torch.equal(model.vit.embeddings.position_embeddings, table)
    assert not model.vit.embeddings.position_embeddings.requires_grad
    pixel_table = model.pixel_decoder.position_embeddings
    assert torch.equal(pixel_table, modeling_bootmae_mto.bootmae_sincos_position_embedding(64, 32))
    assert not pixel_table.requires_grad
    assert model.vit.embeddings.cls_token.abs().max() < 1e-5  # N(0, 1e-6)
    for token in (model.pixel_decoder.mask_token, model.feature_decoder.mask_token):
        assert token.abs().max() <= 0.02 and token.abs().sum() > 0  # truncated at +-1 std
    weight = model.vit.layers[0].attention.q_proj.weight  # Xavier-uniform, q on its own
    assert weight.abs().max() <= math.sqrt(6 / 64) and weight.abs().max() > 0.9 * math.sqrt(6 / 64)
    assert model.vit.layers[0].attention.q_proj.bias.abs().sum() == 0
    cross = model.feature_decoder.layers[0].cross_attention.k_proj.weight  # as the fused key-value layer
    assert cross.abs().max() <= math.sqrt(6 / (32 + 64)) and cross.abs().max() > 0.9 * math.sqrt(6 / (32 + 64))
    head = model.pixel_decoder.head.weight  # PyTorch's ConvTranspose2d default: U(+-1/sqrt(P*P*C))
    assert head.abs().max() <= 1 / math.sqrt(48) and head.abs().max() > 0.9 / math.sqrt(48)
    projection = model.vit.embeddings.patch_embeddings.projection.weight
    bound = math.sqrt(6 / (48 + 32))
    assert projection.abs().max() <= bound and projection.abs().max() > 0.9 * bound
    assert model.training_progress.item() == 0.0


def test_pixel_decoder_heads_round_down_as_the_official_code():
    model = make_model(decoder_hidden_size=40, decoder_num_attention_heads=6)  # 6 heads of 6 = 36 of 40
    attention = model.pixel_decoder.layers[0].attention
    assert attention.q_proj.weight.shape == (36, 40) and attention.o_proj.weight.shape == (40, 36)
    pixels, noise = batch()
    assert torch.isfinite(model(pixels, noise=noise).loss)


def test_save_and_load_round_trip_keeps_teacher_and_progress(tmp_path):
    model = make_model().eval()
    with torch.no_grad():
        for p in model.vit.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.update_teacher(0.3)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "mto.py").is_file() and (tmp_path / "modeling_bootmae_mto.py").is_file()
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, BootMAEMTOConfig)
    assert config.auto_map["AutoModelForPreTraining"] == "modeling_bootmae_mto.BootMAEMTOForPreTraining"
    assert config.momentum_schedule == model.config.momentum_schedule
    loaded = AutoModelForPreTraining.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, BootMAEMTOForPreTraining)
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys() and "training_progress" in state
    assert any(key.startswith("teacher.") for key in state)
    for key in state:
        assert torch.equal(state[key], loaded_state[key]), key
    assert not torch.equal(loaded.teacher.layers[0].mlp.fc1.weight, loaded.vit.layers[0].mlp.fc1.weight)
    # frozen again after loading (transformers 5 loads every floating weight as a trainable parameter)
    frozen = [name for name, p in loaded.named_parameters() if not p.requires_grad]
    assert frozen == [name for name, p in model.named_parameters() if not p.requires_grad]
    assert not any(p.requires_grad for p in loaded.teacher.parameters())
    pixels, noise = batch()
    assert torch.equal(model(pixels, noise=noise).loss, loaded(pixels, noise=noise).loss)


@pytest.mark.slow  # a fresh Python process importing transformers (~6 s): in the slow set
def test_trust_remote_code_load_in_fresh_process_without_hf_mto(tmp_path):
    model = make_model().eval()
    model.update_teacher(0.5)
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
        print(type(model).__module__, out.loss.item(), out.feature_decoder_mto.singularity_loss.item())
        """
    )
    module, loss, singularity = run_without_hf_mto(script, tmp_path).split()
    assert module.startswith("transformers_modules")
    assert float(loss) == pytest.approx(expected.loss.item(), rel=1e-6)
    assert float(singularity) == pytest.approx(expected.feature_decoder_mto.singularity_loss.item(), rel=1e-6)


def test_auto_classes():
    config = AutoConfig.for_model("bootmae_mto", image_size=32, patch_size=4)
    assert isinstance(config, BootMAEMTOConfig)
    assert type(AutoModel.from_config(BootMAEMTOConfig(**TINY_MAE))) is BootMAEMTOModel
    assert methods.method_for("bootmae_mto") is hf_mto.BootMAEMTOMethod
    assert methods.method_for(make_model()).mto_stacks == ("pixel_decoder", "feature_decoder")


def test_defaults_are_the_official_vit_b():
    config = BootMAEMTOConfig()
    assert (config.layer_norm_eps, config.qkv_bias, config.mask_ratio) == (1e-6, True, 0.75)
    assert (config.decoder_hidden_size, config.decoder_num_hidden_layers, config.decoder_num_attention_heads) == (
        512,
        2,
        12,
    )
    assert config.feature_decoder_num_hidden_layers == 2
    assert (config.feature_weight, config.feature_weight_warmup, config.weight_mask, config.norm_pix_loss) == (
        1.0,
        0.25,
        True,
        True,
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"mask_ratio": 1.5}, "1.5"),
        ({"image_size": 30}, "30"),
        ({"feature_decoder_num_hidden_layers": 0}, "feature_decoder_num_hidden_layers must be >= 1, got 0"),
        ({"decoder_num_hidden_layers": 0}, "decoder_num_hidden_layers must be >= 1, got 0"),
        ({"decoder_num_attention_heads": 0}, r"decoder_num_attention_heads \(0\)"),
        ({"feature_weight": -1.0}, "feature_weight must be >= 0, got -1.0"),
        ({"feature_weight_warmup": 1.5}, "feature_weight_warmup must be in .*1.5"),
        ({"momentum_schedule": []}, "momentum_schedule"),
        ({"momentum_schedule": [[0.1, 0.99]]}, r"\[\[0.1, 0.99\]\]"),
        ({"momentum_schedule": [[0.0, 0.99], [0.5, 1.5]]}, r"\[1.5\]"),
        ({"momentum_schedule": [[0.0, 0.99], [0.5, 0.999], [0.4, 0.9999]]}, "increase strictly"),
        ({"momentum_schedule": [[0.0, 0.99, 0.5]]}, "pairs"),
        ({"mto_spa_layers": [0, 3]}, r"\[3\]"),
        ({"mto_affinity": "euclid"}, "'euclid'"),
    ],
)
def test_bad_config_values_raise_value_error_naming_the_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        BootMAEMTOConfig(**{**TINY_MAE, **overrides})


def test_mto_spa_layers_must_fit_both_decoders():
    BootMAEMTOConfig(**TINY_MAE, mto_spa_layers=[2])
    with pytest.raises(ValueError, match=r"\[2\]"):  # the feature decoder has one block: states 0..1
        BootMAEMTOConfig(**TINY_MAE, mto_spa_layers=[2], feature_decoder_num_hidden_layers=1)


# ---------------------------------------------------------------------------------------------------------------------
# Generic code through the method's declarations
# ---------------------------------------------------------------------------------------------------------------------


def test_export_gives_a_plain_vit_with_the_students_features(tmp_path):
    from transformers import ViTModel

    from hf_mto.export import export_encoder

    model = make_model().eval()
    model.update_teacher(0.0)  # teacher == student stays, so move the student to tell them apart
    with torch.no_grad():
        for p in model.vit.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "ckpt")
    output = export_encoder(tmp_path / "ckpt", tmp_path / "encoder")
    encoder, info = ViTModel.from_pretrained(output, add_pooling_layer=False, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert encoder.config.model_type == "vit"
    pixels, _ = batch()
    with torch.no_grad():
        hidden = BootMAEMTOMethod.unmasked_embeddings(model, pixels)
        for layer in model.vit.layers:
            hidden = layer(hidden)
        expected = model.vit.layernorm(hidden)
        torch.testing.assert_close(encoder.eval()(pixels).last_hidden_state, expected, rtol=1e-5, atol=1e-5)


def test_analysis_per_decoder_stack():
    from hf_mto.analysis import analyze_heterogeneity

    model = make_model().eval()
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    results = {
        stack: analyze_heterogeneity(model, images, batch_size=3, stack=stack) for stack in BootMAEMTOMethod.mto_stacks
    }
    for result in results.values():
        assert result.stack in BootMAEMTOMethod.mto_stacks and len(result.heterogeneity) == 3
        assert all(0 < h <= math.log(16) + 1e-5 for h in result.heterogeneity)
    assert results["pixel_decoder"].heterogeneity != results["feature_decoder"].heterogeneity
    states, mask, prediction = BootMAEMTOMethod.analysis_pass(
        model, images[:2], BootMAEMTOMethod.mask_inputs(model, torch.arange(64).repeat(2, 1) >= 16)
    )
    assert set(states) == {"pixel_decoder", "feature_decoder"} and prediction.shape == (2, 3, 32, 32)
    assert mask[:, 16:].all() and not mask[:, :16].any()


def test_evolved_masking_trains_through_the_declarations(tmp_path):
    from conftest import RandomImages

    from hf_mto.evolved import EvolvedMasking
    from hf_mto.trainer import MTOTrainer
    from hf_mto.training_args import MTOTrainingArguments

    model = make_model()
    args = MTOTrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        masking="evolved",
    )
    trainer = MTOTrainer(model=model, args=args, train_dataset=RandomImages(8))
    assert isinstance(trainer.mask_generator, EvolvedMasking)
    trainer.train()
    assert any("evolved/depth" in entry for entry in trainer.state.log_history)


def test_evaluation_of_the_encoder():
    from hf_mto.evaluation import encoder_features, resolve_encoder

    model = make_model().eval()
    assert resolve_encoder(model) is model.vit
    features = encoder_features(model, batch()[0])
    assert features.shape == (3, 32) and torch.isfinite(features).all()


def test_model_card_names_both_decoders(tmp_path):
    from hf_mto.export import export_encoder

    model = make_model().eval()
    model.save_pretrained(tmp_path / "ckpt")
    card = (export_encoder(tmp_path / "ckpt", tmp_path / "encoder") / "README.md").read_text()
    assert "BootMAE pre-training" in card and "pixel_decoder and feature_decoder" in card
    assert "momentum encoder" in card
    # the pre-training model's own card: its parts, per-stack outputs and its paper
    from hf_mto.model_card import render_model_card

    card = render_model_card(model.config)
    for row in ("| pixel decoder | 2 blocks", "| feature decoder |", "| momentum encoder EMA decay |"):
        assert row in card
    assert "`pixel_decoder_mto` and `feature_decoder_mto`" in card
    assert "Bootstrapped Masked Autoencoders for Vision BERT Pretraining" in card and "SimMIM:" not in card


@pytest.mark.slow  # a recipe subprocess: ~25 s on 2 cores
@pytest.mark.skipif(not FASHION_MNIST.exists(), reason="needs Debian's dataset-fashion-mnist")
def test_tiny_preset_runs(tmp_path):
    preset = ROOT / "recipes" / "configs" / "tiny_cpu_bootmae_mto.yaml"
    flags = ["--config", str(preset), "--max_steps", "2", "--max_train_samples", "32", "--max_eval_samples", "16"]
    flags += ["--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", "--logging_steps", "1"]
    flags += ["--dataloader_num_workers", "0", "--report_to", "none", "--save_strategy", "no", "--do_eval", "false"]
    cmd = [sys.executable, str(ROOT / "recipes" / "pretrain.py"), *flags, "--output_dir", str(tmp_path / "run")]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mto/feature_decoder/ranking_loss" in result.stdout + result.stderr


@pytest.mark.slow  # a ViT-B BootMAE built, run and differentiated: ~30 s on 2 cores
def test_vit_b_preset_widths(tmp_path):
    """DESIGN.md's criterion for the default affinity (tests/test_mto_widths.py) on both decoders of the ViT-B
    preset, and its size against the official model's."""
    from test_mto_widths import MIN_H0_FRACTION, MIN_TERM, preset_model_and_inputs

    model, inputs = preset_model_and_inputs(ROOT / "recipes" / "configs" / "vit_base_bootmae_mto_in1k.yaml", tmp_path)
    # official: 115,373,251 trainable; ours adds the key biases (which cannot change attention: 12 x 768 encoder,
    # 2 x 2 x 504 pixel decoder, 2 x 2 x 768 feature decoder) and a per-value pixel-head bias (768, not 3)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 115_373_251 + 12 * 768 + 4 * 504 + 4 * 768 + (768 - 3)
    outputs = model(**inputs, use_mto=True)
    assert int(outputs.mask.sum(dim=1).min()) == 147
    parameters = [p for p in model.parameters() if p.requires_grad]
    for stack in BootMAEMTOMethod.mto_stacks:
        terms = getattr(outputs, f"{stack}_mto")
        heterogeneity = mto.mean_heterogeneity(terms.heterogeneity, outputs.mask)
        assert torch.isfinite(heterogeneity).all() and heterogeneity[0] >= MIN_H0_FRACTION * math.log(49), stack
        for name in ("sparsity_loss", "singularity_loss", "ranking_loss"):
            value = getattr(terms, name)
            assert torch.isfinite(value), (stack, name)
            if name != "singularity_loss":
                grads = torch.autograd.grad(value, parameters, retain_graph=True, allow_unused=True)
                norm = torch.sqrt(sum(g.float().pow(2).sum() for g in grads if g is not None))
                assert value >= MIN_TERM and norm >= MIN_TERM, (stack, name, value.item(), norm.item())
