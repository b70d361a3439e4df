"""Shared fixtures: tiny SD-1.x-architecture models built from config under a fixed seed (never downloaded)."""

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def unet():
    from lycoflow.tiny import tiny_unet

    return tiny_unet(seed=0)


@pytest.fixture
def text_encoder():
    from lycoflow.tiny import tiny_text_encoder

    return tiny_text_encoder(seed=0)
