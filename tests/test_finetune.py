"""hf_mto.finetuning and recipes/finetune.py: MAE's fine-tuning recipe on the HF Trainer, from MAE and BootMAE
encoders."""

import copy
import json
import runpy
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import TINY_MAE, TINY_VIT
from PIL import Image, ImageOps
from timm.layers import DropPath
from transformers import (
    AutoModelForImageClassification,
    BeitConfig,
    BeitForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)
from transformers.trainer_utils import EvalPrediction

from hf_mto import BootMAEMTOConfig, BootMAEMTOForPreTraining, ViTMAEMTOConfig, ViTMAEMTOForPreTraining
from hf_mto.data import PixelCollator
from hf_mto.export import export_encoder
from hf_mto.finetuning import (
    AccuracyMetric,
    FinetuneArguments,
    FinetuneTrainer,
    FinetuneTrainingArguments,
    apply_drop_path,
    build_classification_model,
    build_train_transform,
    freeze_for_partial_finetuning,
    layer_decay_param_groups,
    posterize,
    prepare_labels,
    vit_layer_id,
)
from hf_mto.models.vit_gap import ViTGAPForImageClassification

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
TINY_CLASSIFIER = dict(TINY_VIT, hidden_dropout_prob=0.0)


def tiny_classifier(num_labels=3, seed=0, **overrides):
    torch.manual_seed(seed)
    return ViTForImageClassification(ViTConfig(**{**TINY_CLASSIFIER, **overrides}, num_labels=num_labels))


def labelled(n, num_classes=3, seed=0):
    images = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return [{"pixel_values": images[i], "label": i % num_classes} for i in range(n)]


def training_args(tmp_path, **kwargs):
    defaults = dict(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, save_strategy="no")
    return FinetuneTrainingArguments(**{**defaults, **kwargs})


PRETRAINING_MODELS = {
    "mae": (ViTMAEMTOConfig, ViTMAEMTOForPreTraining),
    "bootmae_mto": (BootMAEMTOConfig, BootMAEMTOForPreTraining),
}


@pytest.fixture(scope="module", params=sorted(PRETRAINING_MODELS))
def exported_encoder(request, tmp_path_factory):
    """A tiny pre-training checkpoint (MAE; BootMAE, whose momentum encoder has moved away from its encoder) and its
    exported encoder (model_type vit)."""
    root = tmp_path_factory.mktemp("finetune")
    config_class, model_class = PRETRAINING_MODELS[request.param]
    torch.manual_seed(0)
    model = model_class(config_class(**TINY_MAE))
    if hasattr(model, "update_teacher"):
        with torch.no_grad():
            for param in model.vit.parameters():
                param.add_(0.01 * torch.randn_like(param))
        model.update_teacher(0.5)
    model.save_pretrained(root / "pretrained")
    return root / "pretrained", export_encoder(root / "pretrained", root / "encoder")


# ---- layer-wise lr decay ------------------------------------------------------------------------------------------


def test_layer_ids_follow_depth():
    assert vit_layer_id("vit.embeddings.cls_token", 12) == 0
    assert vit_layer_id("vit.embeddings.patch_embeddings.projection.weight", 12) == 0
    assert vit_layer_id("vit.layers.0.attention.q_proj.weight", 12) == 1
    assert vit_layer_id("vit.layers.11.mlp.fc2.bias", 12) == 12
    assert vit_layer_id("vit.encoder.layer.3.output.dense.weight", 12) == 4  # transformers 4.x names
    for name in ("vit.layernorm.weight", "fc_norm.bias", "classifier.weight"):
        assert vit_layer_id(name, 12) == 13


def test_layer_decay_param_groups_scale_each_layer():
    model = tiny_classifier()
    groups = layer_decay_param_groups(model, weight_decay=0.05, layer_decay=0.5)
    names = {id(param): name for name, param in model.named_parameters()}
    scale, decay = {}, {}
    for group in groups:
        for param in group["params"]:
            scale[names[id(param)]], decay[names[id(param)]] = group["lr_scale"], group["weight_decay"]
    assert set(scale) == set(names.values())  # every parameter once
    for name, value in scale.items():
        if name.startswith("vit.embeddings."):
            expected = 0.5**3  # layer 0 of L + 2 = 4 layers
        elif name.startswith("vit.layers.0."):
            expected = 0.5**2
        elif name.startswith("vit.layers.1."):
            expected = 0.5
        else:  # vit.layernorm, classifier
            expected = 1.0
        assert value == pytest.approx(expected), name
    assert groups[0]["lr_scale"] == 1.0  # the head's group first: the lr the Trainer logs is the peak
    no_decay = {name for name, value in decay.items() if value == 0}
    assert {"vit.embeddings.cls_token", "vit.embeddings.position_embeddings", "classifier.bias"} <= no_decay
    assert "vit.layers.0.layernorm_before.weight" in no_decay
    assert decay["vit.embeddings.patch_embeddings.projection.weight"] == 0.05 and decay["classifier.weight"] == 0.05
    with pytest.raises(ValueError, match="layer_decay"):
        layer_decay_param_groups(model, 0.05, 0.0)
    with pytest.raises(ValueError, match="no"):
        layer_decay_param_groups(torch.nn.Linear(2, 2), 0.05, 0.5)


def test_trainer_optimizer_uses_the_scaled_learning_rates(tmp_path):
    args = training_args(tmp_path, base_learning_rate=1e-3, per_device_train_batch_size=64, layer_decay=0.5)
    assert args.learning_rate == pytest.approx(1e-3 * 64 / 256)
    trainer = FinetuneTrainer(model=tiny_classifier(), args=args)
    optimizer = trainer.create_optimizer()
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(args.learning_rate * group["lr_scale"])
    assert sorted({round(group["lr_scale"], 6) for group in optimizer.param_groups}) == [0.125, 0.25, 0.5, 1.0]
    # layer decay off: the stock Trainer's two groups at one learning rate
    stock = FinetuneTrainer(model=tiny_classifier(), args=training_args(tmp_path, layer_decay=None))
    assert {group["lr"] for group in stock.create_optimizer().param_groups} == {stock.args.learning_rate}


# ---- partial fine-tuning ------------------------------------------------------------------------------------------


def test_partial_finetuning_trains_the_last_blocks_only(tmp_path):
    """trainable_blocks = 1 of 2: the embeddings and block 0 are frozen and left out of the optimizer (with and
    without layer decay), a training step leaves them as they were and moves the rest; 0 leaves the head and the
    final norm; all blocks is full fine-tuning; more than the encoder has is refused by name."""
    model = tiny_classifier()
    frozen = freeze_for_partial_finetuning(model, 1)
    assert frozen and all(name.startswith(("vit.embeddings.", "vit.layers.0.")) for name in frozen)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert set(frozen) | trainable == {name for name, _ in model.named_parameters()}
    assert {"vit.embeddings.cls_token", "vit.layers.0.attention.q_proj.weight"} <= set(frozen)
    assert {"vit.layers.1.attention.q_proj.weight", "vit.layernorm.weight", "classifier.weight"} <= trainable
    for layer_decay in (0.75, None):
        args = training_args(tmp_path, layer_decay=layer_decay, max_steps=1, per_device_train_batch_size=4)
        before = copy.deepcopy(model.state_dict())
        trainer = FinetuneTrainer(model=model, args=args, train_dataset=labelled(4))
        optimized = {id(param) for group in trainer.create_optimizer().param_groups for param in group["params"]}
        names = {id(param): name for name, param in model.named_parameters()}
        assert {names[key] for key in optimized} == trainable
        trainer.train()
        after = model.state_dict()
        for name in frozen:
            assert torch.equal(after[name], before[name]), name
        assert not torch.equal(after["vit.layers.1.mlp.fc1.weight"], before["vit.layers.1.mlp.fc1.weight"])

    head_only = tiny_classifier()
    freeze_for_partial_finetuning(head_only, 0)
    assert {name for name, param in head_only.named_parameters() if param.requires_grad} == {
        "vit.layernorm.weight", "vit.layernorm.bias", "classifier.weight", "classifier.bias",
    }  # fmt: skip
    assert freeze_for_partial_finetuning(tiny_classifier(), 2) == []
    with pytest.raises(ValueError, match=r"trainable_blocks must be in \[0, 2\].*got 3"):
        freeze_for_partial_finetuning(tiny_classifier(), 3)
    with pytest.raises(ValueError, match="partial fine-tuning needs a ViT.*Linear has none"):
        freeze_for_partial_finetuning(torch.nn.Linear(2, 2), 0)


def test_partial_finetuning_freezes_beits_shared_position_bias():
    """BEiT's relative position bias shared by all blocks (BEiT's and ConMIM's encoders) is frozen with the
    embeddings: left trainable it would change what the frozen blocks compute."""
    config = BeitConfig(**TINY_VIT, use_shared_relative_position_bias=True, use_mean_pooling=True, num_labels=3)
    model = BeitForImageClassification(config)
    frozen = set(freeze_for_partial_finetuning(model, 1))
    assert "beit.shared_position_bias.relative_position_bias_table" in frozen
    assert {"beit.embeddings.cls_token", "beit.layers.0.attention.q_proj.weight"} <= frozen
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert "beit.layers.1.attention.q_proj.weight" in trainable and "classifier.weight" in trainable


def test_classifier_with_trainable_blocks_freezes_the_rest(exported_encoder):
    _, encoder_dir = exported_encoder
    args = FinetuneArguments(model_name_or_path=str(encoder_dir), global_pool=True, trainable_blocks=1)
    model = build_classification_model(args, ["a", "b"])
    assert not model.vit.layers[0].mlp.fc1.weight.requires_grad and not model.vit.embeddings.cls_token.requires_grad
    assert model.vit.layers[1].mlp.fc1.weight.requires_grad and model.fc_norm.weight.requires_grad
    with pytest.raises(ValueError, match="trainable_blocks must be in .*got 5"):
        build_classification_model(FinetuneArguments(model_name_or_path=str(encoder_dir), trainable_blocks=5), ["a"])


# ---- Mixup / CutMix -----------------------------------------------------------------------------------------------


class Spy:
    """Records what the trainer's Mixup returns."""

    def __init__(self, mixup):
        self.mixup, self.calls = mixup, []

    def __call__(self, images, labels):
        mixed, targets = self.mixup(images, labels)
        self.calls.append((mixed.clone(), targets.clone()))
        return mixed, targets


def test_mixup_step_uses_soft_targets(tmp_path):
    args = training_args(tmp_path, mixup=0.8, cutmix=1.0, per_device_train_batch_size=4, label_smoothing_factor=0.1)
    model = tiny_classifier()
    trainer = FinetuneTrainer(model=model, args=args, data_collator=PixelCollator(include_labels=True))
    assert trainer.mixup is not None and trainer.mixup.num_classes == 3 and trainer.mixup.label_smoothing == 0.1
    trainer.mixup = Spy(trainer.mixup)
    batch = PixelCollator(include_labels=True)(labelled(5))  # odd: the last image sits the step out
    model.train()
    loss = trainer.compute_loss(model, dict(batch))
    (mixed, targets) = trainer.mixup.calls[-1]
    assert mixed.shape[0] == 4 and targets.shape == (4, 3)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(4))
    assert (targets.max(dim=1).values < 1.0).all()  # soft: smoothed and mixed
    with torch.no_grad():
        expected = -(targets * torch.log_softmax(model(pixel_values=mixed).logits, dim=-1)).sum(dim=1).mean()
    torch.testing.assert_close(loss.detach(), expected)
    # evaluation never mixes: the model's own loss
    model.eval()
    with torch.no_grad():
        eval_loss = trainer.compute_loss(model, dict(PixelCollator(include_labels=True)(labelled(4))))
    assert len(trainer.mixup.calls) == 1 and torch.isfinite(eval_loss)


def test_mixup_training_runs(tmp_path):
    args = training_args(tmp_path, mixup=0.8, cutmix=1.0, per_device_train_batch_size=4, max_steps=2, logging_steps=1)
    model = tiny_classifier()
    before = copy.deepcopy(model.state_dict())
    trainer = FinetuneTrainer(
        model=model, args=args, train_dataset=labelled(8), data_collator=PixelCollator(include_labels=True)
    )
    result = trainer.train()
    assert np.isfinite(result.training_loss) and result.global_step == 2
    assert not torch.equal(before["classifier.weight"], model.state_dict()["classifier.weight"])
    assert not torch.equal(before["vit.embeddings.cls_token"], model.state_dict()["vit.embeddings.cls_token"])


def test_mixup_needs_an_even_batch():
    with pytest.raises(ValueError, match="even per_device_train_batch_size, got 5"):
        FinetuneTrainingArguments(output_dir="unused", mixup=0.8, per_device_train_batch_size=5)
    FinetuneTrainingArguments(output_dir="unused", per_device_train_batch_size=5)  # fine without Mixup


# ---- stochastic depth ---------------------------------------------------------------------------------------------


def test_drop_path_in_training_only():
    model = tiny_classifier(num_hidden_layers=3)
    reference = copy.deepcopy(model)
    keys = set(model.state_dict())
    rates = apply_drop_path(model, 0.9)
    assert rates == pytest.approx([0.0, 0.45, 0.9])
    assert set(model.state_dict()) == keys  # no parameter added: checkpoints are unchanged
    assert isinstance(model.vit.layers[0].dropout, torch.nn.Dropout)  # rate 0: untouched
    assert isinstance(model.vit.layers[2].dropout[1], DropPath) and model.vit.layers[2].dropout[1].drop_prob == 0.9

    layer, reference_layer = model.vit.layers[2], reference.vit.layers[2]
    hidden = torch.randn(64, 65, 32, generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(hidden), reference_layer(hidden))  # eval: identity
        torch.testing.assert_close(model(torch.randn(2, 3, 32, 32)).logits.shape, torch.Size([2, 3]))
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        out = layer(hidden)
    untouched = [torch.equal(out[i], hidden[i]) for i in range(64)]
    # each sample drops both branches with probability 0.81: its output is its input; the others are not
    assert 30 < sum(untouched) < 64


def test_drop_path_rejects_bad_use():
    model = tiny_classifier()
    with pytest.raises(ValueError, match="drop_path_rate"):
        apply_drop_path(model, 1.0)
    apply_drop_path(model, 0.2)
    with pytest.raises(ValueError, match="already applied"):
        apply_drop_path(model, 0.2)
    with pytest.raises(ValueError, match="no transformers ViTLayer"):
        apply_drop_path(torch.nn.Linear(2, 2), 0.1)


# ---- model construction -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("global_pool", [False, True])
def test_classifier_from_exported_encoder(exported_encoder, global_pool):
    _, encoder_dir = exported_encoder
    args = FinetuneArguments(model_name_or_path=str(encoder_dir), global_pool=global_pool, drop_path_rate=0.1)
    model = build_classification_model(args, ["a", "b", "c"])
    assert type(model) is (ViTGAPForImageClassification if global_pool else ViTForImageClassification)
    assert model.config.id2label == {0: "a", 1: "b", 2: "c"} and model.config.num_labels == 3
    encoder, info = ViTModel.from_pretrained(encoder_dir, add_pooling_layer=False, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    encoder, state = encoder.state_dict(), model.state_dict()
    for key, value in encoder.items():
        if global_pool and key.startswith("layernorm."):
            assert f"vit.{key}" not in state  # MAE drops the final norm under GAP
        else:
            assert torch.equal(state[f"vit.{key}"], value), key
    assert model.classifier.weight.abs().max() < 1e-4  # MAE's head init, std 2e-5
    assert torch.equal(model.classifier.bias, torch.zeros(3))
    if global_pool:
        assert torch.equal(model.fc_norm.weight, torch.ones(32)) and torch.equal(model.fc_norm.bias, torch.zeros(32))
    assert isinstance(model.vit.layers[1].dropout[1], DropPath)


def test_classifier_from_a_pretraining_checkpoint_exports_its_encoder(exported_encoder):
    pretrained_dir, encoder_dir = exported_encoder
    from_checkpoint = build_classification_model(FinetuneArguments(model_name_or_path=str(pretrained_dir)), ["a", "b"])
    from_export = build_classification_model(FinetuneArguments(model_name_or_path=str(encoder_dir)), ["a", "b"])
    theirs = from_export.state_dict()
    assert all(torch.equal(value, theirs[key]) for key, value in from_checkpoint.state_dict().items() if "vit." in key)


def test_classifier_from_a_classifier_with_other_labels(tmp_path):
    tiny_classifier(num_labels=7).save_pretrained(tmp_path / "seven")
    model = build_classification_model(FinetuneArguments(model_name_or_path=str(tmp_path / "seven")), ["x", "y"])
    assert model.classifier.weight.shape == (2, 32)


def test_bad_checkpoints(tmp_path, exported_encoder):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert'"):
        build_classification_model(FinetuneArguments(model_name_or_path=str(tmp_path / "bert")), ["a", "b"])
    with pytest.raises(FileNotFoundError, match="export_encoder"):
        build_classification_model(FinetuneArguments(model_name_or_path=str(tmp_path / "missing")), ["a", "b"])
    # a GAP checkpoint has no final norm: the CLS classifier refuses it rather than starting from a random one
    gap = build_classification_model(
        FinetuneArguments(model_name_or_path=str(exported_encoder[1]), global_pool=True), ["a", "b"]
    )
    gap.save_pretrained(tmp_path / "gap")
    with pytest.raises(ValueError, match="vit.layernorm.weight.*needs --global_pool"):
        build_classification_model(FinetuneArguments(model_name_or_path=str(tmp_path / "gap")), ["a", "b"])


def test_argument_validation():
    for kwargs, message in (
        ({"drop_path_rate": 1.0}, "drop_path_rate"),
        ({"reprob": 1.5}, "reprob"),
        ({"remode": "zeros"}, "remode"),
        ({"eval_crop_pct": 0.0}, "eval_crop_pct"),
        ({"head_init_std": 0.0}, "head_init_std"),
        ({"crop_min_scale": 0.0}, "crop_min_scale"),
        ({"trainable_blocks": -1}, "trainable_blocks must be >= 0"),
    ):
        with pytest.raises(ValueError, match=message):
            FinetuneArguments(model_name_or_path="x", **kwargs)
    for kwargs, message in (
        ({"layer_decay": 1.5}, "layer_decay"),
        ({"mixup": -1.0}, "mixup alpha"),
        ({"cutmix_minmax": [0.5]}, "cutmix_minmax"),
        ({"mixup_mode": "row"}, "mixup_mode"),
        ({"mixup_prob": 2.0}, "mixup_prob"),
        ({"label_smoothing_factor": 1.0}, "label_smoothing_factor"),
        ({"base_learning_rate": 0.0}, "base_learning_rate"),
    ):
        with pytest.raises(ValueError, match=message):
            FinetuneTrainingArguments(output_dir="unused", **kwargs)


# ---- data ---------------------------------------------------------------------------------------------------------


def image_split(labels, feature=None):
    images = [Image.new("L", (8, 8), color) for color in range(len(labels))]
    features = datasets.Features({"image": datasets.Image(), "label": feature or datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def test_prepare_labels():
    splits = datasets.DatasetDict({"train": image_split(["cat", "dog", "cat"]), "validation": image_split(["dog"])})
    assert prepare_labels(splits) == ["cat", "dog"]
    assert splits["validation"]["label"] == [1] and isinstance(splits["train"].features["label"], datasets.ClassLabel)
    ints = datasets.DatasetDict(
        {
            "train": image_split([0, 2], datasets.Value("int64")),
            "validation": image_split([1], datasets.Value("int64")),
        }
    )
    assert prepare_labels(ints) == ["0", "1", "2"]
    with pytest.raises(ValueError, match=r"classes the training split lacks: \['bird'\]"):
        prepare_labels(
            datasets.DatasetDict({"train": image_split(["cat", "dog"]), "validation": image_split(["bird"])})
        )
    with pytest.raises(ValueError, match="at least 2 classes"):
        prepare_labels(datasets.DatasetDict({"train": image_split(["cat", "cat"])}))
    unlabelled = datasets.Dataset.from_dict({"image": [Image.new("L", (8, 8))]})
    with pytest.raises(ValueError, match="no label column.*--label_column_name"):
        prepare_labels(datasets.DatasetDict({"train": unlabelled}))


def test_train_transform_and_posterize():
    args = FinetuneArguments(model_name_or_path="x", reprob=0.25)
    transform = build_train_transform(32, [0.5] * 3, [0.5] * 3, args)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8), mode="L")
    torch.manual_seed(0)
    assert all(transform(image).shape == (3, 32, 32) for _ in range(10))
    # MAE's policy asks for 0 bits at magnitude 10, which the Pillow pinned here refuses: the op must not raise
    rand_augment = next(step for step in transform.transforms[1].transforms if hasattr(step, "ops"))
    (op,) = [op for op in rand_augment.ops if op.name == "PosterizeIncreasing"]
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    rgb = image.convert("RGB")
    assert np.asarray(op(rgb)).max() == 0
    assert np.asarray(posterize(rgb, 0)).max() == 0
    assert np.array_equal(np.asarray(posterize(rgb, 3)), np.asarray(ImageOps.posterize(rgb, 3)))
    assert posterize(rgb, 8) is rgb
    with pytest.raises(ValueError, match="auto_augment 'rand-m9-xx3'"):
        build_train_transform(
            32, [0.5] * 3, [0.5] * 3, FinetuneArguments(model_name_or_path="x", auto_augment="rand-m9-xx3")
        )


def test_accuracy_metric_through_evaluate():
    metric = AccuracyMetric()
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert metric(EvalPrediction(predictions=logits, label_ids=np.array([1, 0, 0, 0]))) == {"accuracy": 0.75}
    assert metric(EvalPrediction(predictions=np.array([1, 1]), label_ids=np.array([1, 0]))) == {"accuracy": 0.5}


# ---- recipes/finetune.py ------------------------------------------------------------------------------------------

RECIPE_FLAGS = [
    "--max_train_samples",
    "32",
    "--max_eval_samples",
    "16",
    "--per_device_train_batch_size",
    "8",
    "--per_device_eval_batch_size",
    "16",
    "--max_steps",
    "2",
    "--num_train_epochs",
    "1",
    "--logging_steps",
    "1",
    "--dataloader_num_workers",
    "0",
    "--report_to",
    "none",
    "--eval_strategy",
    "no",
    "--save_strategy",
    "no",
]


def test_presets_parse():
    from hf_mto.cli import parse_args
    from hf_mto.data import DataArguments

    dataclasses = (FinetuneArguments, DataArguments, FinetuneTrainingArguments)
    configs = ROOT / "recipes" / "configs"
    args, data_args, training_args = parse_args(dataclasses, ["--config", str(configs / "tiny_cpu_finetune.yaml")])
    assert data_args.dataset_name is None and training_args.learning_rate == pytest.approx(4e-3 * 128 / 256)
    # ImageNet: MAE's ViT-B recipe (bf16 needs a GPU; the rest is checked here)
    args, data_args, training_args = parse_args(
        dataclasses, ["--config", str(configs / "vit_base_finetune_in1k.yaml"), "--bf16", "false"]
    )
    assert args.global_pool and args.drop_path_rate == 0.1 and args.reprob == 0.25
    assert args.auto_augment == "rand-m9-mstd0.5-inc1" and args.crop_min_scale == 0.08
    assert (training_args.mixup, training_args.cutmix, training_args.label_smoothing_factor) == (0.8, 1.0, 0.1)
    assert training_args.layer_decay == 0.65 and training_args.weight_decay == 0.05
    assert (training_args.adam_beta1, training_args.adam_beta2) == (0.9, 0.999)
    assert training_args.num_train_epochs == 100 and training_args.warmup_steps == 0.05
    assert training_args.base_learning_rate == 5e-4 and training_args.per_device_train_batch_size * 8 == 1024


def run_recipe(argv):
    return runpy.run_path(str(ROOT / "recipes" / "finetune.py"))["main"](argv)


@pytest.mark.skipif(not FASHION_MNIST.exists(), reason="needs Debian's dataset-fashion-mnist")
def test_recipe_fine_tunes_an_exported_encoder(exported_encoder, tmp_path):
    _, encoder_dir = exported_encoder
    out = tmp_path / "ft"
    argv = ["--config", str(ROOT / "recipes" / "configs" / "tiny_cpu_finetune.yaml"), *RECIPE_FLAGS]
    argv += ["--model_name_or_path", str(encoder_dir), "--output_dir", str(out), "--global_pool", "false"]
    argv += ["--mixup", "0.8", "--cutmix", "1.0", "--auto_augment", "rand-m9-mstd0.5-inc1", "--reprob", "0.25"]
    metrics = run_recipe(argv)
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and np.isfinite(metrics["eval_loss"])
    # a plain transformers checkpoint: no hf_mto model type, loads with the stock Auto class
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "vit" and "auto_map" not in config
    model = AutoModelForImageClassification.from_pretrained(out)
    assert type(model) is ViTForImageClassification
    assert model.config.id2label[0] == "T-shirt/top" and model.config.num_labels == 10
    assert (out / "preprocessor_config.json").is_file() and (out / "eval_results.json").is_file()


@pytest.mark.skipif(not FASHION_MNIST.exists(), reason="needs Debian's dataset-fashion-mnist")
def test_recipe_rejects_an_unknown_label_column(exported_encoder, tmp_path):
    argv = [*RECIPE_FLAGS, "--output_dir", str(tmp_path / "ft")]
    with pytest.raises(ValueError, match="label_column_name 'labels_x' is not a column"):
        run_recipe([*argv, "--model_name_or_path", str(exported_encoder[1]), "--label_column_name", "labels_x"])
    with pytest.raises(FileNotFoundError, match="cannot read the checkpoint .*nothing"):
        run_recipe([*argv, "--model_name_or_path", str(tmp_path / "nothing")])
