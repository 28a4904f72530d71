"""The shared part of each model folder's test module: transformers' own generic model tests (`ModelTesterMixin`,
`ConfigTester`) and the tiny ViT tester shape they run at, in upstream's tester style.

The mixins come from the sdist of the installed transformers (`transformers_common.load_common_tests`). Without
network on the first run, every `ConformanceTest` class is skipped and says why; the rest of a model's test module
still runs.

Skip list: none of our own. Every generic test has the same outcome on our classes as on the upstream classes they
extend (each model's module runs upstream's too, as the reference); every skip is the mixin's own, with its reason, on
both (no accelerator, no flash attention or kernels library, no `inputs_embeds`, not a composite or MoE model,
transformers' `@slow` without RUN_SLOW, ...). The checkpoint-mapping tests (`test_reverse_loading_mapping`,
`test_can_load_from_already_mapped_keys`) run on ours because the modeling files register upstream's conversion
mapping for our classes.

Inputs carry a fixed mask (the same count masked in every image, as hf_mto's generators do), so outputs are
deterministic and the MTO terms are computed in every forward with MTO on. Upstream's own ViTMAE tests skip the
determinism, output-equivalence and batching tests because its mask is random in each forward; with the mask fixed
they run, on upstream's classes and ours.
"""

from __future__ import annotations

import unittest
import warnings

import pytest
import torch
import transformers
from transformers_common import CommonTestsUnavailable, load_common_tests

from hf_mto import methods
from hf_mto.models.vit_gap import ViTGAPConfig

# The mixin tells a base model (no loss) or a head by upstream's static name tables, one per Auto class.
_NAME_TABLES = {
    "AutoModel": "MODEL_MAPPING_NAMES",
    "AutoModelForPreTraining": "MODEL_FOR_PRETRAINING_MAPPING_NAMES",
    "AutoModelForMaskedImageModeling": "MODEL_FOR_MASKED_IMAGE_MODELING_MAPPING_NAMES",
    "AutoModelForImageClassification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
}


def _add_registered_classes(test_modeling_common) -> None:
    """Add hf_mto's classes (every registered method's and the fine-tuning classifier), as their Auto registration
    maps them, to the mixin's copies of upstream's name tables: classes registered at run time do not appear there,
    and without them the tests meant for base models or heads would pass ours by running nothing."""
    registered = [(ViTGAPConfig, "AutoModel"), (ViTGAPConfig, "AutoModelForImageClassification")]
    for method in methods.registered_methods():
        registered += [(method.config_class, "AutoModel"), (method.config_class, method.auto_class_name)]
    for config_class, auto_class_name in registered:
        table_name = _NAME_TABLES[auto_class_name]
        table = dict(getattr(test_modeling_common, table_name))
        auto_class = getattr(transformers, auto_class_name)
        table[config_class.model_type] = auto_class._model_mapping[config_class].__name__
        setattr(test_modeling_common, table_name, table)


try:
    with warnings.catch_warnings():
        # upstream's marks (flash_attn_test, ...) are registered in its own pytest config, not ours
        warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
        test_modeling_common, test_configuration_common = load_common_tests()
    UNAVAILABLE = None
except CommonTestsUnavailable as error:
    UNAVAILABLE = f"transformers' common model tests are not available: {error}"


class ViTModelTester:
    """Upstream's ViT / ViTMAE tester shape at the tiny size of this suite: image 32, patch 4, hidden 32, 2 layers.
    A model's tester adds its own config fields and inputs (`config_kwargs`, `prepare_config_and_inputs_for_common`).
    """

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

    def pixel_values(self) -> torch.Tensor:
        return torch.rand(self.batch_size, self.num_channels, self.image_size, self.image_size)

    def fixed_mask(self) -> torch.Tensor:
        """``[batch, num_patches]`` bool, `num_masks` patches masked per image, the same in every call."""
        generator = torch.Generator().manual_seed(0)
        order = torch.stack([torch.randperm(self.num_patches, generator=generator) for _ in range(self.batch_size)])
        return order < self.num_masks


class NoiseMaskedModelTester(ViTModelTester):
    """The tester of a model whose encoder drops the masked patches, as ViTMAE's (upstream's ViTMAE tester shape, the
    decoder as wide and deep as the encoder) with a fixed mask: the model keeps the patches of the smallest noise,
    so a fixed noise is a fixed mask."""

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
        generator = torch.Generator().manual_seed(1)
        noise = self.fixed_mask().float() + torch.rand(self.batch_size, self.num_patches, generator=generator)
        return self.get_config(), {"pixel_values": self.pixel_values(), "noise": noise}


if UNAVAILABLE is None:

    class ConformanceTest(test_modeling_common.ModelTesterMixin):
        """transformers' generic model tests for `all_model_classes`, built by `model_tester_class` from
        `config_class` with `config_overrides` (MTO on or off)."""

        model_tester_class: type[ViTModelTester]
        config_class: type
        config_overrides: dict = {}
        test_resize_embeddings = False
        test_torch_exportable = True

        def setUp(self):
            self.model_tester = self.model_tester_class(self, self.config_class, **self.config_overrides)
            # hidden 48: a non-default width our configs accept (they check it divides among the 12 default heads)
            self.config_tester = test_configuration_common.ConfigTester(
                self, config_class=self.config_class, has_text_modality=False, hidden_size=48
            )

        def test_config(self):
            self.config_tester.run_common_tests()

        def test_model_get_set_embeddings(self):
            # The mixin's version expects a token embedding table; a ViT's input embedding is its patch projection
            # and it has no output embedding (upstream's ViT and ViTMAE tests override it the same way).
            config, _ = self.model_tester.prepare_config_and_inputs_for_common()
            for model_class in self.all_model_classes:
                model = model_class(config)
                self.assertIsInstance(model.get_input_embeddings(), torch.nn.Module)
                self.assertIsNone(model.get_output_embeddings())

    _add_registered_classes(test_modeling_common)
else:

    @unittest.skip(UNAVAILABLE)
    class ConformanceTest:
        """Stands in for the generic tests where they could not be loaded: every class built on it is skipped."""

        def test_generic_model_tests(self):
            """Skipped: says why the generic tests did not run."""
