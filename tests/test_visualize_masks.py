"""recipes/visualize_masks.py on a tiny saved checkpoint and the embedded default data."""

import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_MAE
from PIL import Image
from test_recipe_pretrain import FASHION_MNIST

from hf_mto import ViTMAEMTOConfig, ViTMAEMTOForPreTraining
from hf_mto.data import build_image_processor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import visualize_masks  # noqa: E402


@pytest.mark.skipif(not FASHION_MNIST.exists(), reason="needs Debian's dataset-fashion-mnist")
def test_writes_one_picture_per_image(tmp_path):
    torch.manual_seed(0)
    model = ViTMAEMTOForPreTraining(ViTMAEMTOConfig(**TINY_MAE))
    model.save_pretrained(tmp_path / "ckpt")
    build_image_processor(model.config).save_pretrained(tmp_path / "ckpt")
    out = visualize_masks.main(
        ["--checkpoint", str(tmp_path / "ckpt"), "--output_dir", str(tmp_path / "pics"), "--num_images", "2"]
        + ["--max_eval_samples", "4", "--max_train_samples", "4"]
    )
    pictures = sorted(out.glob("*.png"))
    assert [p.name for p in pictures] == ["image_0.png", "image_1.png"]
    width, height = Image.open(pictures[0]).size
    assert width > 2 * height  # two rows of five panels


def test_bad_schedule_points_are_rejected():
    with pytest.raises(ValueError, match=r"\[1.5\]"):
        visualize_masks.VisualizeArguments(checkpoint="x", schedule_points=[0.0, 1.5])
