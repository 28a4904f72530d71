"""hf_mto.evaluation: k-NN and linear-probe accuracy of frozen encoder features, the Trainer callback, the recipe."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import TINY_MAE, TINY_VIT
from transformers import ViTConfig, ViTForImageClassification, ViTModel

from hf_mto import SimMIMMTOConfig, SimMIMMTOForMaskedImageModeling, ViTMAEMTOConfig, ViTMAEMTOForPreTraining
from hf_mto.evaluation import (
    EncoderEvalArguments,
    EncoderEvalCallback,
    encoder_features,
    evaluate_encoder,
    extract_features,
    knn_accuracy,
    knn_predict,
    linear_probe_accuracy,
    resolve_encoder,
)
from hf_mto.export import export_encoder
from hf_mto.trainer import MTOTrainer
from hf_mto.training_args import MTOTrainingArguments

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def pixels(n=4, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def labelled(n, num_classes=2, seed=0):
    images = pixels(n, seed)
    return [{"pixel_values": images[i], "label": i % num_classes} for i in range(n)]


# ---- k-NN ---------------------------------------------------------------------------------------------------------


def test_knn_weights_are_exp_similarity_over_temperature():
    # Query [1, 0]; bank: A = [1, 0] (class 1, similarity 1), B and C at similarity 0.6 (class 0).
    bank = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    labels = torch.tensor([1, 0, 0])
    query = torch.tensor([[2.0, 0.0]])  # any length: cosine similarity
    predictions, scores = knn_predict(bank, labels, query, k=3, temperature=0.07)
    w1, w0 = math.exp(1 / 0.07), 2 * math.exp(0.6 / 0.07)
    assert predictions.tolist() == [1]  # one close neighbour outweighs two farther ones at T = 0.07
    torch.testing.assert_close(scores, torch.tensor([[w0 / (w0 + w1), w1 / (w0 + w1)]]))
    # A high temperature makes the weights nearly equal: the majority (class 0) wins.
    predictions, scores = knn_predict(bank, labels, query, k=3, temperature=100.0)
    w1, w0 = math.exp(1 / 100), 2 * math.exp(0.6 / 100)
    assert predictions.tolist() == [0]
    torch.testing.assert_close(scores, torch.tensor([[w0 / (w0 + w1), w1 / (w0 + w1)]]))


def test_knn_uses_only_the_k_nearest():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.9]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    queries = torch.tensor([[1.0, 0.05], [0.05, 1.0], [0.8, 0.6]])
    # k = 2: each query's two nearest are of one class; with all 5 the third query's class-1 majority would show.
    predictions, scores = knn_predict(bank, labels, queries, k=2, temperature=0.07)
    assert predictions.tolist() == [0, 1, 0]
    assert scores[0, 1] == 0 and scores[1, 0] == 0
    # k above the bank size uses the whole bank, and tiny temperatures do not overflow
    predictions, scores = knn_predict(bank, labels, queries, k=50, temperature=1e-3)
    assert torch.isfinite(scores).all() and predictions.tolist() == [0, 1, 0]


def test_knn_accuracy_hand_checked():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 2])
    queries = torch.tensor([[1.0, 0.1], [0.1, 1.0], [-1.0, -0.1], [0.9, -0.2]])
    # nearest neighbours (k = 1): 0, 1, 2, 0 against the truth 0, 1, 2, 2: 3 of 4 right
    assert knn_accuracy(bank, labels, queries, torch.tensor([0, 1, 2, 2]), k=1) == pytest.approx(0.75)


def test_knn_rejects_bad_input():
    bank, labels = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 0])
    with pytest.raises(ValueError, match="query features"):
        knn_predict(bank, labels, torch.randn(2, 4))
    with pytest.raises(ValueError, match="temperature"):
        knn_predict(bank, labels, torch.randn(2, 3), temperature=0.0)
    with pytest.raises(ValueError, match="k must be"):
        knn_predict(bank, labels, torch.randn(2, 3), k=0)
    with pytest.raises(ValueError, match="labels"):
        knn_predict(bank, labels[:4], torch.randn(2, 3))
    with pytest.raises(ValueError, match=">= 0"):
        knn_predict(bank, torch.tensor([0, 1, -1, 1, 0]), torch.randn(2, 3))


# ---- linear probe -------------------------------------------------------------------------------------------------


def test_linear_probe_separates_separable_features():
    generator = torch.Generator().manual_seed(0)
    centres = 4.0 * torch.randn(3, 16, generator=generator)

    def sample(n):
        labels = torch.arange(n) % 3
        return centres[labels] + torch.randn(n, 16, generator=generator), labels

    train_x, train_y = sample(150)
    test_x, test_y = sample(60)
    assert linear_probe_accuracy(train_x, train_y, test_x, test_y) >= 0.95
    # labels unrelated to the features: around chance
    assert linear_probe_accuracy(train_x, train_y, test_x, test_y[torch.randperm(60, generator=generator)]) < 0.7


def test_linear_probe_rejects_one_class():
    with pytest.raises(ValueError, match="at least 2 classes"):
        linear_probe_accuracy(torch.randn(4, 2), torch.zeros(4), torch.randn(2, 2), torch.zeros(2))
    with pytest.raises(ValueError, match="C must be"):
        linear_probe_accuracy(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]), torch.randn(2, 2), torch.zeros(2), c=0)


# ---- features -----------------------------------------------------------------------------------------------------


def exported_features(model, tmp_path, images):
    """CLS and patch-mean features of the model's encoder exported to a plain ViTModel (every patch, no masking)."""
    encoder = ViTModel.from_pretrained(export_encoder(model, tmp_path / "encoder"), add_pooling_layer=False).eval()
    with torch.no_grad():
        hidden = encoder(images).last_hidden_state
    return hidden[:, 0], hidden[:, 1:].mean(dim=1)


def test_mae_features_are_unmasked_and_deterministic(tmp_path):
    torch.manual_seed(0)
    model = ViTMAEMTOForPreTraining(ViTMAEMTOConfig(**TINY_MAE)).eval()  # mask_ratio 0.75
    images = pixels()
    with torch.no_grad():
        first, second = encoder_features(model, images), encoder_features(model, images)
        mean = encoder_features(model, images, pooling="mean")
    assert torch.equal(first, second)  # MAE's own forward would mask a random 75 % each call
    cls_reference, mean_reference = exported_features(model, tmp_path, images)
    torch.testing.assert_close(first, cls_reference)
    torch.testing.assert_close(mean, mean_reference)
    # the same through the encoder itself and the upstream class it derives from
    with torch.no_grad():
        torch.testing.assert_close(encoder_features(model.vit, images), cls_reference)


def test_simmim_features_are_unmasked_and_deterministic(tmp_path):
    torch.manual_seed(0)
    model = SimMIMMTOForMaskedImageModeling(SimMIMMTOConfig(**TINY_VIT, encoder_stride=4)).eval()
    images = pixels()
    with torch.no_grad():
        first, second = encoder_features(model, images), encoder_features(model, images)
        mean = encoder_features(model, images, pooling="mean")
    assert torch.equal(first, second)
    cls_reference, mean_reference = exported_features(model, tmp_path, images)
    torch.testing.assert_close(first, cls_reference)
    torch.testing.assert_close(mean, mean_reference)


def test_plain_vits_and_bad_models():
    torch.manual_seed(0)
    classifier = ViTForImageClassification(ViTConfig(**TINY_VIT, num_labels=3)).eval()
    assert resolve_encoder(classifier) is classifier.vit and resolve_encoder(classifier.vit) is classifier.vit
    with torch.no_grad():
        torch.testing.assert_close(
            encoder_features(classifier, pixels()), classifier.vit(pixels()).last_hidden_state[:, 0]
        )
    with pytest.raises(ValueError, match="cannot find a ViT encoder in a Linear"):
        resolve_encoder(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="pooling"):
        encoder_features(classifier, pixels(), pooling="max")


def test_extract_features_keeps_order_labels_and_training_mode():
    torch.manual_seed(0)
    model = ViTModel(ViTConfig(**TINY_VIT), add_pooling_layer=False)
    model.train()
    dataset = labelled(7, num_classes=3)
    features, labels = extract_features(model, dataset, batch_size=3)
    assert model.training  # restored
    assert features.shape == (7, 32) and features.dtype == torch.float32
    assert labels.tolist() == [0, 1, 2, 0, 1, 2, 0]
    model.eval()
    with torch.no_grad():
        expected = model(torch.stack([example["pixel_values"] for example in dataset])).last_hidden_state[:, 0]
    torch.testing.assert_close(features, expected)


def test_evaluate_encoder_on_separable_images():
    # two classes of images that differ in brightness: any encoder's features separate them
    torch.manual_seed(0)
    model = ViTModel(ViTConfig(**TINY_VIT), add_pooling_layer=False)
    images = pixels(40, seed=1) * 0.1
    data = [{"pixel_values": images[i] + (2.0 if i % 2 else -2.0), "label": i % 2} for i in range(40)]
    results = evaluate_encoder(model, data[:30], data[30:], k=5, batch_size=16)
    assert results == {"knn_accuracy": 1.0, "linear_probe_accuracy": 1.0, "num_train": 30.0, "num_eval": 10.0}
    assert "linear_probe_accuracy" not in evaluate_encoder(model, data[:30], data[30:], k=5, linear_probe=False)


def test_encoder_eval_arguments_validate():
    assert EncoderEvalArguments().knn_k == 20 and EncoderEvalArguments().knn_temperature == 0.07
    for bad, message in (
        ({"encoder_eval_pooling": "max"}, "pooling must be one of"),
        ({"knn_k": 0}, "k must be a positive integer, got 0"),
        ({"knn_temperature": -1.0}, "temperature must be > 0, got -1.0"),
        ({"linear_probe_c": 0.0}, "C must be > 0, got 0.0"),
        ({"encoder_eval_train_samples": 0}, "encoder_eval_train_samples must be a positive integer"),
        ({"encoder_eval_batch_size": 0}, "encoder_eval_batch_size must be positive"),
    ):
        with pytest.raises(ValueError, match=message):
            EncoderEvalArguments(**bad)


# ---- Trainer callback ---------------------------------------------------------------------------------------------


def make_trainer(tmp_path):
    torch.manual_seed(0)
    model = ViTMAEMTOForPreTraining(ViTMAEMTOConfig(**TINY_MAE))
    args = MTOTrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=8, report_to="none", use_cpu=True)
    eval_images = [{"pixel_values": image} for image in pixels(8, seed=3)]
    from hf_mto.data import PixelCollator

    return MTOTrainer(model=model, args=args, eval_dataset=eval_images, data_collator=PixelCollator())


def test_callback_adds_and_logs_the_accuracies(tmp_path):
    trainer = make_trainer(tmp_path)
    callback = EncoderEvalCallback(labelled(12, seed=1), labelled(6, seed=2), k=3).attach(trainer)
    assert callback in trainer.callback_handler.callbacks
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics
    for key in ("eval_knn_accuracy", "eval_linear_probe_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
        assert any(key in entry for entry in trainer.state.log_history)  # logged like any metric
    # the model's own evaluation mode and masking are untouched: a second evaluation at the same step reuses them
    assert trainer.evaluate()["eval_knn_accuracy"] == metrics["eval_knn_accuracy"]
    # another prefix follows the evaluation's own
    assert "test_knn_accuracy" in trainer.evaluate(metric_key_prefix="test")


def test_callback_without_attach_still_returns_the_metrics(tmp_path, caplog):
    trainer = make_trainer(tmp_path)
    trainer.add_callback(EncoderEvalCallback(labelled(12, seed=1), labelled(6, seed=2), k=3, linear_probe=False))
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval_knn_accuracy"] <= 1.0 and "eval_linear_probe_accuracy" not in metrics
    assert not any("eval_knn_accuracy" in entry for entry in trainer.state.log_history)
    assert "not attached" in caplog.text


def test_callback_rejects_empty_data():
    with pytest.raises(ValueError, match="eval_dataset"):
        EncoderEvalCallback(labelled(4), [])
    with pytest.raises(ValueError, match="pooling"):
        EncoderEvalCallback(labelled(4), labelled(4), pooling="max")


# ---- recipes/evaluate_encoder.py ----------------------------------------------------------------------------------


@pytest.mark.skipif(not FASHION_MNIST.exists(), reason="needs Debian's dataset-fashion-mnist")
def test_recipe_on_a_saved_checkpoint(tmp_path):
    torch.manual_seed(0)
    checkpoint = tmp_path / "mae"
    ViTMAEMTOForPreTraining(ViTMAEMTOConfig(**TINY_MAE)).save_pretrained(checkpoint)
    output = tmp_path / "results" / "eval.json"
    command = [
        sys.executable,
        str(ROOT / "recipes" / "evaluate_encoder.py"),
        "--checkpoint",
        str(checkpoint),
        "--encoder_eval_train_samples",
        "200",
        "--encoder_eval_eval_samples",
        "100",
        "--knn_k",
        "10",
        "--output_file",
        str(output),
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["checkpoint"] == str(checkpoint)
    assert report["num_train"] == 200 and report["num_eval"] == 100
    # a random tiny encoder still beats chance (10 classes) on Fashion-MNIST
    assert 0.15 < report["knn_accuracy"] <= 1.0 and 0.15 < report["linear_probe_accuracy"] <= 1.0
    assert report["settings"]["knn_k"] == 10 and report["settings"]["knn_temperature"] == 0.07
    assert "knn_accuracy" in result.stdout


def test_recipe_rejects_a_non_vit_checkpoint(tmp_path):
    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        from evaluate_encoder import load_model
    finally:
        sys.path.remove(str(ROOT / "recipes"))
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert' is not a ViT"):
        load_model(str(tmp_path / "bert"))
    (tmp_path / "gap").mkdir()
    (tmp_path / "gap" / "config.json").write_text(json.dumps({"model_type": "vit_gap"}))
    with pytest.raises(ValueError, match="fine-tuned vit_gap classifier"):
        load_model(str(tmp_path / "gap"))


# ---- two processes ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_features_are_gathered_over_two_processes(tmp_path):
    script = tmp_path / "features.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import torch
            from accelerate import PartialState
            from transformers import ViTConfig, ViTModel
            from hf_mto import evaluation
            from hf_mto.evaluation import extract_features

            state = PartialState(cpu=True)
            torch.manual_seed(0)
            model = ViTModel(ViTConfig(**{TINY_VIT!r}), add_pooling_layer=False)
            images = torch.randn(9, 3, 32, 32, generator=torch.Generator().manual_seed(0))
            data = [{{"pixel_values": images[i], "label": i}} for i in range(9)]
            features, labels = extract_features(model, data, batch_size=2)
            # the accuracies are scored by the main process alone and reach every process
            probes = []
            fit = evaluation.linear_probe_accuracy
            evaluation.linear_probe_accuracy = lambda *args: probes.append(1) or fit(*args)
            labelled = [dict(example, label=i % 3) for i, example in enumerate(data)]
            results = evaluation.evaluate_encoder(model, labelled, labelled, k=3, batch_size=2)
            fits = len(probes)
            # an error of the main process's scoring is raised on every process instead of leaving them waiting
            one_class = [dict(example, label=0) for example in data]
            try:
                evaluation.evaluate_encoder(model, one_class, one_class, k=3)
            except ValueError as error:
                raised = str(error)
            outcome = (state.num_processes, features, labels, results, fits, raised)
            torch.save(outcome, {str(tmp_path)!r} + f"/rank{{state.process_index}}.pt")
            state.wait_for_everyone()
            torch.distributed.destroy_process_group()
            """
        )
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-3000:]
    torch.manual_seed(0)
    model = ViTModel(ViTConfig(**TINY_VIT), add_pooling_layer=False)
    images = torch.randn(9, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reference, _ = extract_features(model, [{"pixel_values": images[i], "label": i} for i in range(9)])
    outcomes = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    for world, features, labels, results, _, raised in outcomes:
        assert world == 2
        assert labels.tolist() == list(range(9))  # every example once, in order, on both processes
        torch.testing.assert_close(features, reference)
        assert results == outcomes[0][3] and 0 <= results["linear_probe_accuracy"] <= 1
        assert "at least 2 classes" in raised
    assert [outcome[4] for outcome in outcomes] == [1, 0]  # the probe was fitted once, on the main process
