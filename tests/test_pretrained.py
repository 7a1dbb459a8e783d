"""The shipped class-conditional model loads, samples images of the right shape and range, and draws the
classes it is asked for (judged by the shipped classifier). Fails, rather than skips, if the weights go missing:
later lessons depend on them."""

import json

import pytest
import torch

from lessons_lib.config import PRETRAINED_MODEL
from lessons_lib.data import FASHION_MNIST_CLASSES
from lessons_lib.metrics import default_classifier
from lessons_lib.pipeline import DiffusionPipeline


@pytest.fixture(scope="module")
def pipe():
    return DiffusionPipeline.from_pretrained(PRETRAINED_MODEL, device="cpu")


def test_folder_is_complete_and_small():
    files = {p.name for p in PRETRAINED_MODEL.iterdir()}
    assert {"model.safetensors", "config.json", "README.md"} <= files
    assert sum(p.stat().st_size for p in PRETRAINED_MODEL.iterdir()) < 15 * 2**20
    config = json.loads((PRETRAINED_MODEL / "config.json").read_text())
    assert config["weights"] == "ema" and config["model"]["num_classes"] == 10
    card = (PRETRAINED_MODEL / "README.md").read_text()
    assert config["weights_sha256"] in card, "the model card must name the weights it describes"


def test_samples_have_shape_range_and_the_requested_class(pipe):
    per_class = 3
    labels = torch.arange(10).repeat_interleave(per_class)
    images = torch.cat([pipe(per_class, c, steps=25, sampler="ddim", seed=100 * c, guidance_scale=2.0,
                             progress=False)[0] for c in range(10)])
    assert images.shape == (30, 1, 28, 28) and torch.isfinite(images).all()
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0.3  # real contrast, not grey mush
    with torch.no_grad():
        predicted = default_classifier()(images).argmax(1)
    accuracy = (predicted == labels).float().mean().item()
    assert accuracy >= 0.7, (f"the classifier agrees with the requested class on {accuracy:.0%} of samples; "
                             f"classes: {FASHION_MNIST_CLASSES}")
