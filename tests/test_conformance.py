"""transformers' own generic model tests (`ModelTesterMixin`, `ConfigTester`) on our models, MTO on and off.

The same tests run on the upstream classes ours extend (`ViTMAEForPreTraining`, `ViTForMaskedImageModeling`, with
their base models) as the reference: every test that passes there passes on ours, or is skipped on ours for a reason
that holds. The mixins come from the sdist of the installed transformers (tests/transformers_common.py); without
network on the first run the module is skipped.

Skip list: none of our own. Every test has the same outcome on our classes as on upstream's; every skip is the
mixin's own, with its reason, on both (no accelerator, no flash attention or kernels library, no `inputs_embeds`, not
a composite or MoE model, transformers' `@slow` without RUN_SLOW, ...). The checkpoint-mapping tests
(`test_reverse_loading_mapping`, `test_can_load_from_already_mapped_keys`) run on ours because the modeling files
register upstream's conversion mapping for our classes.

Inputs carry a fixed mask (`noise` for MAE, `bool_masked_pos` for SimMIM, the same count masked in every image as
hf_mto's generators do), so outputs are deterministic and the MTO terms are computed in every forward with MTO on.
Upstream's own test files skip the determinism, output-equivalence and batching tests for ViTMAE because its mask
is random in each forward; with the mask fixed they run, on upstream's classes and ours.
"""

import unittest
import warnings

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForMaskedImageModeling,
    AutoModelForPreTraining,
    ViTConfig,
    ViTForMaskedImageModeling,
    ViTMAEConfig,
    ViTMAEForPreTraining,
    ViTMAEModel,
    ViTModel,
)
from transformers_common import CommonTestsUnavailable, load_common_tests

from hf_mto import (
    SimMIMMTOConfig,
    SimMIMMTOForMaskedImageModeling,
    SimMIMMTOModel,
    ViTMAEMTOConfig,
    ViTMAEMTOForPreTraining,
    ViTMAEMTOModel,
)

try:
    with warnings.catch_warnings():
        # upstream's marks (flash_attn_test, ...) are registered in its own pytest config, not ours
        warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
        test_modeling_common, test_configuration_common = load_common_tests()
except CommonTestsUnavailable as error:
    pytest.skip(f"transformers' common model tests are not available: {error}", allow_module_level=True)


def _add_registered_classes(table_name: str, auto_class) -> None:
    """Add hf_mto's classes, as its registration with `auto_class` maps them, to the mixin's copy of the name table
    `table_name`: the mixin tells a base model (no loss) or a head by upstream's static tables, where classes
    registered at run time do not appear. Without this, the tests meant for base models would pass ours by
    running nothing."""
    table = dict(getattr(test_modeling_common, table_name))
    for config_class in (ViTMAEMTOConfig, SimMIMMTOConfig):
        try:
            table[config_class.model_type] = auto_class._model_mapping[config_class].__name__
        except KeyError:
            continue
    setattr(test_modeling_common, table_name, table)


_add_registered_classes("MODEL_MAPPING_NAMES", AutoModel)
_add_registered_classes("MODEL_FOR_PRETRAINING_MAPPING_NAMES", AutoModelForPreTraining)
_add_registered_classes("MODEL_FOR_MASKED_IMAGE_MODELING_MAPPING_NAMES", AutoModelForMaskedImageModeling)

ModelTesterMixin = test_modeling_common.ModelTesterMixin
ConfigTester = test_configuration_common.ConfigTester
floats_tensor = test_modeling_common.floats_tensor


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class _Tester:
    """Upstream's ViT / ViTMAE tester shape at the tiny size of this suite: image 32, patch 4, hidden 32, 2 layers."""

    batch_size = 13
    image_size = 32
    patch_size = 4
    num_channels = 3
    hidden_size = 32
    num_hidden_layers = 2
    num_attention_heads = 4
    intermediate_size = 37
    mask_ratio = 0.5
    is_training = True

    def __init__(self, parent, config_class, **config_overrides):
        self.parent = parent
        self.config_class = config_class
        self.config_overrides = config_overrides
        self.num_patches = (self.image_size // self.patch_size) ** 2
        self.num_masks = int(self.mask_ratio * self.num_patches)
        self.mask_length = self.num_patches

    def config_kwargs(self) -> dict:
        return dict(
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_channels=self.num_channels,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.1,
            initializer_range=0.02,
            attn_implementation="eager",
        )

    def get_config(self):
        return self.config_class(**self.config_kwargs(), **self.config_overrides)

    def fixed_mask(self) -> torch.Tensor:
        """``[batch, num_patches]`` bool, `num_masks` patches masked per image, the same in every call."""
        generator = torch.Generator().manual_seed(0)
        order = torch.stack([torch.randperm(self.num_patches, generator=generator) for _ in range(self.batch_size)])
        return order < self.num_masks


class MAETester(_Tester):
    def __init__(self, parent, config_class, **config_overrides):
        super().__init__(parent, config_class, **config_overrides)
        # the encoder sees the CLS token and the kept patches
        self.seq_length = 1 + int(self.num_patches * (1 - self.mask_ratio))

    def config_kwargs(self) -> dict:
        return dict(
            super().config_kwargs(),
            mask_ratio=self.mask_ratio,
            decoder_hidden_size=self.hidden_size,
            decoder_intermediate_size=self.intermediate_size,
            decoder_num_attention_heads=self.num_attention_heads,
            decoder_num_hidden_layers=self.num_hidden_layers,
        )

    def prepare_config_and_inputs_for_common(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        # MAE keeps the patches with the smallest noise: a fixed noise is a fixed mask.
        noise = self.fixed_mask().float() + torch.rand(self.batch_size, self.num_patches, generator=_generator(1))
        return self.get_config(), {"pixel_values": pixel_values, "noise": noise}


class SimMIMTester(_Tester):
    seq_length = 1 + (_Tester.image_size // _Tester.patch_size) ** 2

    def config_kwargs(self) -> dict:
        return dict(super().config_kwargs(), encoder_stride=self.patch_size)

    def prepare_config_and_inputs_for_common(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        return self.get_config(), {"pixel_values": pixel_values, "bool_masked_pos": self.fixed_mask()}


class EncoderTester(SimMIMTester):
    """SimMIM's encoder alone: built without a mask token (as upstream's `ViTModel(config)`), it takes no mask."""

    def prepare_config_and_inputs_for_common(self):
        config, inputs = super().prepare_config_and_inputs_for_common()
        del inputs["bool_masked_pos"]
        return config, inputs


class _ConformanceTest(ModelTesterMixin):
    model_tester_class: type[_Tester]
    config_class: type
    config_overrides: dict = {}
    test_resize_embeddings = False
    test_torch_exportable = True

    def setUp(self):
        self.model_tester = self.model_tester_class(self, self.config_class, **self.config_overrides)
        # hidden 48: a non-default width our configs accept (they check it divides among the 12 default heads)
        self.config_tester = ConfigTester(
            self, config_class=self.config_class, has_text_modality=False, hidden_size=48
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model_get_set_embeddings(self):
        # The mixin's version expects a token embedding table; a ViT's input embedding is its patch projection and
        # it has no output embedding (upstream's ViT and ViTMAE tests override it the same way).
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIsInstance(model.get_input_embeddings(), torch.nn.Module)
            self.assertIsNone(model.get_output_embeddings())


class UpstreamViTMAETest(_ConformanceTest, unittest.TestCase):
    all_model_classes = (ViTMAEModel, ViTMAEForPreTraining)
    model_tester_class = MAETester
    config_class = ViTMAEConfig


class ViTMAEMTOOnTest(_ConformanceTest, unittest.TestCase):
    all_model_classes = (ViTMAEMTOModel, ViTMAEMTOForPreTraining)
    model_tester_class = MAETester
    config_class = ViTMAEMTOConfig
    config_overrides = {"use_mto": True}


class ViTMAEMTOOffTest(_ConformanceTest, unittest.TestCase):
    all_model_classes = (ViTMAEMTOModel, ViTMAEMTOForPreTraining)
    model_tester_class = MAETester
    config_class = ViTMAEMTOConfig
    config_overrides = {"use_mto": False}


class UpstreamViTSimMIMTest(_ConformanceTest, unittest.TestCase):
    all_model_classes = (ViTForMaskedImageModeling,)
    model_tester_class = SimMIMTester
    config_class = ViTConfig


class SimMIMMTOOnTest(_ConformanceTest, unittest.TestCase):
    all_model_classes = (SimMIMMTOForMaskedImageModeling,)
    model_tester_class = SimMIMTester
    config_class = SimMIMMTOConfig
    config_overrides = {"use_mto": True}


class SimMIMMTOOffTest(_ConformanceTest, unittest.TestCase):
    all_model_classes = (SimMIMMTOForMaskedImageModeling,)
    model_tester_class = SimMIMTester
    config_class = SimMIMMTOConfig
    config_overrides = {"use_mto": False}


class UpstreamViTEncoderTest(_ConformanceTest, unittest.TestCase):
    all_model_classes = (ViTModel,)
    model_tester_class = EncoderTester
    config_class = ViTConfig


class SimMIMMTOEncoderTest(_ConformanceTest, unittest.TestCase):
    """`SimMIMMTOModel`, the encoder `AutoModel` gives for a SimMIM+MTO checkpoint (it computes no MTO term)."""

    all_model_classes = (SimMIMMTOModel,)
    model_tester_class = EncoderTester
    config_class = SimMIMMTOConfig
