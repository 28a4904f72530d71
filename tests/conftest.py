"""Shared tiny configurations (image 32, patch 4, hidden 32, 2 layers) so the suite stays fast on 2 CPU cores."""

import os
import subprocess
import sys

import pytest
import torch

# Tests never reach the Hub: everything is built from configs and packaged data.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: unknown where xdist is not installed
def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject's default): one worker per core, at most 4. The tiny models leave a core mostly idle
    between small kernels, so processes side by side pay where intra-op threads do not; more than a few workers each
    spend their own ~10 s collecting the suite (transformers' generic tests included) for little gain."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, 4) if cores > 1 else 0


def pytest_configure(config):
    """Under pytest-xdist, each worker (and the subprocesses its tests start) gets an equal share of the cores as
    torch threads, instead of every worker spinning up one thread per core."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


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


def _restore_registrations_after_the_test(monkeypatch) -> None:
    """The method registry and transformers' Auto registrations (which `register_method` adds to) as they were,
    once the test is over."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING

    from hf_mto import methods

    monkeypatch.setattr(methods, "_METHODS", dict(methods._METHODS))
    mappings = [CONFIG_MAPPING, IMAGE_PROCESSOR_MAPPING]
    for name in ("AutoModel", "AutoModelForPreTraining", "AutoModelForMaskedImageModeling"):
        mappings.append(getattr(transformers, name)._model_mapping)
    for mapping in mappings:
        monkeypatch.setattr(mapping, "_extra_content", dict(mapping._extra_content))


@pytest.fixture
def dummy_method(monkeypatch):
    """A method registered for one test only: SimMIM's model under a model type of its own, with other declarations
    (name, default masking `beit_block`) and hooks that record their calls (`steps`: (model, progress) per
    `on_step_end`, `masks`: each mask given to `mask_inputs`). Generic code that follows the declarations, not the
    model's class, treats its model differently from SimMIM's."""
    from hf_mto import SimMIMMTOConfig, SimMIMMTOForMaskedImageModeling, SimMIMMTOMethod, SimMIMMTOModel, methods

    class DummyConfig(SimMIMMTOConfig):
        model_type = "dummy_mim"

    class DummyModel(SimMIMMTOForMaskedImageModeling):
        config_class = DummyConfig

    class DummyEncoder(SimMIMMTOModel):
        config_class = DummyConfig

    class DummyMethod(SimMIMMTOMethod):
        name = "DummyMIM"
        config_class = DummyConfig
        model_class = DummyModel
        base_model_class = DummyEncoder
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

    _restore_registrations_after_the_test(monkeypatch)
    return methods.register_method(DummyMethod)


@pytest.fixture
def two_view_method(monkeypatch):
    """A method registered for one test only, with what the coming methods need and MAE and SimMIM do not: two MTO
    stacks (as BootMAE's two decoders) and a second view of every image, in training and evaluation (as ConMIM's).

    Its model runs SimMIM on each view with the same mask and returns the first view's MTO terms as the stack
    ``"first"`` and the second view's as ``"second"``; its loss is the mean of the two reconstruction losses, each
    logged (`loss_components`). The second view is the image flipped upside down. `inputs` records the forward
    arguments of every two-view call."""
    from dataclasses import dataclass

    import torchvision.transforms.v2.functional as F

    from hf_mto import SimMIMMTOConfig, SimMIMMTOForMaskedImageModeling, SimMIMMTOMethod, SimMIMMTOModel, methods
    from hf_mto.data import build_eval_transform
    from hf_mto.models.simmim_mto.modeling_simmim_mto import SimMIMMTOOutput

    class TwoViewConfig(SimMIMMTOConfig):
        model_type = "two_view_mim"

    @dataclass
    class TwoViewOutput(SimMIMMTOOutput):
        first_mto: SimMIMMTOOutput | None = None
        second_mto: SimMIMMTOOutput | None = None

    class TwoViewModel(SimMIMMTOForMaskedImageModeling):
        config_class = TwoViewConfig

        def forward(self, pixel_values, second_pixel_values=None, bool_masked_pos=None, **kwargs):
            if second_pixel_values is None:  # one view: SimMIM's forward (the analysis pass calls it)
                return super().forward(pixel_values, bool_masked_pos=bool_masked_pos, **kwargs)
            use_mto = kwargs.get("use_mto")
            TwoViewMethod.inputs.append({"pixel_values": pixel_values, "second_pixel_values": second_pixel_values})
            first = super().forward(pixel_values, bool_masked_pos=bool_masked_pos, use_mto=use_mto)
            second = super().forward(second_pixel_values, bool_masked_pos=bool_masked_pos, use_mto=use_mto)
            return TwoViewOutput(
                loss=(first.loss + second.loss) / 2,
                reconstruction=first.reconstruction,
                mask=first.mask,
                first_mto=first,
                second_mto=second,
            )

    class TwoViewEncoder(SimMIMMTOModel):
        config_class = TwoViewConfig

    class TwoViewMethod(SimMIMMTOMethod):
        name = "TwoView"
        config_class = TwoViewConfig
        model_class = TwoViewModel
        base_model_class = TwoViewEncoder
        extends = ()
        mto_stacks = ("first", "second")
        inputs = []

        @classmethod
        def pretraining_transform(cls, image_size, image_mean, image_std, config=None):
            view = build_eval_transform(image_size, image_mean, image_std, crop_pct=1.0)
            return lambda image: {"pixel_values": view(image), "second_pixel_values": F.vertical_flip(view(image))}

        @classmethod
        def evaluation_transform(cls, image_size, image_mean, image_std, config=None):
            return cls.pretraining_transform(image_size, image_mean, image_std)

        @classmethod
        def loss_components(cls, outputs):
            return {"first_loss": outputs.first_mto.loss, "second_loss": outputs.second_mto.loss}

        @classmethod
        def analysis_pass(cls, model, pixel_values, mask_inputs):
            states, mask, prediction = super().analysis_pass(model, pixel_values, mask_inputs)
            flipped, _, _ = super().analysis_pass(model, pixel_values.flip(-2), mask_inputs)
            return {"first": states["encoder"], "second": flipped["encoder"]}, mask, prediction

    _restore_registrations_after_the_test(monkeypatch)
    return methods.register_method(TwoViewMethod)
