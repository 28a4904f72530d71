"""Shared tiny configurations (image 32, patch 4, hidden 32, 2 layers) so the suite stays fast on 2 CPU cores."""

import os
import subprocess
import sys

import pytest
import torch

# Tests never reach the Hub: everything is built from configs and packaged data.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# The encoder every tiny model shares; SimMIM's head reconstructs one patch per position (encoder_stride = patch_size).
TINY_VIT = dict(
    image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
)
TINY_SIMMIM = dict(TINY_VIT, encoder_stride=4)
TINY_MAE = dict(
    TINY_VIT,
    decoder_hidden_size=32,
    decoder_num_hidden_layers=2,
    decoder_num_attention_heads=4,
    decoder_intermediate_size=64,
    mask_ratio=0.75,
)


class RandomImages(torch.utils.data.Dataset):
    """``n`` seeded random 32 px images as ``{"pixel_values"}`` examples, for Trainer runs on the tiny configs."""

    def __init__(self, n=32):
        self.pixels = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.pixels)

    def __getitem__(self, i):
        return {"pixel_values": self.pixels[i]}


@pytest.fixture
def tiny_mae_kwargs():
    return dict(TINY_MAE)


def run_without_hf_mto(script: str, tmp_path) -> str:
    """Run `script` in a fresh Python where `import hf_mto` fails, as for a user who only has transformers; returns
    its stdout. Remote code is cached under `tmp_path` so no run sees another's modules."""
    blocked = 'import sys\nsys.modules["hf_mto"] = None  # any import of hf_mto fails\n'
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", blocked + script], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def dummy_method(monkeypatch):
    """A method registered for one test only: SimMIM's model under a model type of its own, with other declarations
    (name, default masking `beit_block`) and hooks that record their calls (`steps`: (model, progress) per
    `on_step_end`, `masks`: each mask given to `mask_inputs`). Generic code that follows the declarations, not the
    model's class, treats its model differently from SimMIM's."""
    from hf_mto import SimMIMMTOConfig, SimMIMMTOForMaskedImageModeling, SimMIMMTOMethod, methods

    class DummyConfig(SimMIMMTOConfig):
        model_type = "dummy_mim"

    class DummyModel(SimMIMMTOForMaskedImageModeling):
        config_class = DummyConfig

    class DummyMethod(SimMIMMTOMethod):
        name = "DummyMIM"
        config_class = DummyConfig
        model_class = DummyModel
        extends = ()
        default_masking = "beit_block"
        steps = []
        masks = []

        @classmethod
        def on_step_end(cls, model, progress):
            cls.steps.append((model, progress))

        @classmethod
        def mask_inputs(cls, model, mask):
            cls.masks.append(mask)
            return super().mask_inputs(model, mask)

    monkeypatch.setattr(methods, "_METHODS", dict(methods._METHODS))  # the registry as it was, after the test
    return methods.register_method(DummyMethod)
