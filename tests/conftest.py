"""Shared tiny configurations (image 32, patch 4, hidden 32, 2 layers) so the suite stays fast on 2 CPU cores."""

import os

import pytest

# Tests never reach the Hub: everything is built from configs and packaged data.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TINY_MAE = dict(
    image_size=32,
    patch_size=4,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    decoder_hidden_size=32,
    decoder_num_hidden_layers=2,
    decoder_num_attention_heads=4,
    decoder_intermediate_size=64,
    mask_ratio=0.75,
)


@pytest.fixture
def tiny_mae_kwargs():
    return dict(TINY_MAE)
