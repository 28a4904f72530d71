"""ViTGAPConfig / ViTGAPForImageClassification (hf_mto/models/vit_gap): transformers' generic model tests against
upstream ViTForImageClassification (`ViTGAPModelTester`, see tests/conformance.py), then MAE's global average
pooling, saving and remote-code loading at the suite's tiny config."""

import json
import textwrap
import unittest

import torch
from conformance import ConformanceTest, ViTModelTester
from conftest import TINY_VIT, run_without_hf_mto
from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification, ViTModel

from hf_mto.models.vit_gap import ViTGAPConfig, ViTGAPForImageClassification, ViTGAPModel

TINY_CLASSIFIER = dict(TINY_VIT, hidden_dropout_prob=0.0)


class ViTGAPModelTester(ViTModelTester):
    """Upstream's ViT classification tester shape: 10 labels, pixel values only (the mixin adds labels)."""

    type_sequence_label_size = 10
    seq_length = 1 + (ViTModelTester.image_size // ViTModelTester.patch_size) ** 2

    def config_kwargs(self) -> dict:
        return dict(super().config_kwargs(), num_labels=self.type_sequence_label_size)

    def prepare_config_and_inputs_for_common(self):
        return self.get_config(), {"pixel_values": self.pixel_values()}


class UpstreamViTClassifierTest(ConformanceTest, unittest.TestCase):
    """The reference: upstream's classifier (CLS token) under the same tests."""

    all_model_classes = (ViTModel, ViTForImageClassification)
    model_tester_class = ViTGAPModelTester
    config_class = ViTConfig


class ViTGAPTest(ConformanceTest, unittest.TestCase):
    all_model_classes = (ViTGAPModel, ViTGAPForImageClassification)
    model_tester_class = ViTGAPModelTester
    config_class = ViTGAPConfig


def test_gap_classifier_pools_the_patch_tokens(tmp_path):
    torch.manual_seed(0)
    model = ViTGAPForImageClassification(ViTGAPConfig(**TINY_CLASSIFIER, num_labels=3)).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hidden = model.vit.embeddings(images)
        for layer in model.vit.layers:
            hidden = layer(hidden)  # no final layernorm: MAE normalises after pooling
        expected = model.classifier(model.fc_norm(hidden[:, 1:].mean(dim=1)))
        logits = model(images).logits
    torch.testing.assert_close(logits, expected)
    assert "vit.layernorm.weight" not in model.state_dict() and "fc_norm.weight" in model.state_dict()

    model.save_pretrained(tmp_path / "gap")
    config = json.loads((tmp_path / "gap" / "config.json").read_text())
    assert config["model_type"] == "vit_gap" and "AutoModelForImageClassification" in config["auto_map"]
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "gap").eval()
    assert type(reloaded) is ViTGAPForImageClassification
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images).logits, logits)
    torch.save(images, tmp_path / "images.pt")
    script = textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForImageClassification
        model = AutoModelForImageClassification.from_pretrained({str(tmp_path / "gap")!r}, trust_remote_code=True)
        with torch.no_grad():
            print(model.eval()(torch.load({str(tmp_path / "images.pt")!r})).logits.tolist())
        """
    )
    remote = json.loads(run_without_hf_mto(script, tmp_path).strip().splitlines()[-1])
    torch.testing.assert_close(torch.tensor(remote), logits)
