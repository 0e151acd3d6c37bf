"""Shared fixtures: tiny models built from configs, images drawn by the tests."""

import os

import pytest
import torch

# Tiny models are dominated by per-op overhead; one thread avoids oversubscribing 2-core CI machines.
torch.set_num_threads(int(os.environ.get("PTI_TEST_THREADS", "1")))


@pytest.fixture
def tiny_bundle():
    from pti_ops.models import load_bundle

    return load_bundle("tiny")


@pytest.fixture
def image_folder(tmp_path):
    from example_images import write_example_images

    folder = tmp_path / "images"
    write_example_images(folder, count=4, size=48)
    return folder


@pytest.fixture
def tiny_dataset(image_folder):
    from pti_ops.dataset import DatasetConfig, load_image_folder

    return load_image_folder(image_folder, DatasetConfig(resolution=32))
