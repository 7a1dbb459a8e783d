"""How to read the course's FID / precision / recall: real images scored against real images, then degraded on purpose.

Every row scores n images against the whole Fashion-MNIST test split (10,000 images), in the feature
space of the shipped classifier (``data/pretrained/fmnist_classifier``), with k = 3 for the manifolds:

- ``train (real)``: n training images, a fixed seeded subset: the floor, what a perfect generator scores;
- ``blur sigma=1``, ``noise std 0.1 / 0.3``: the same images, blurred or with Gaussian noise added in
  model units ([-1, 1], so std 0.1 is 12.75 grey levels) and clipped;
- ``5 classes``: n training images of classes 0-4 only (T-shirt, trouser, pullover, dress, coat): mode dropping.

Run from the repository root:  python benchmarks/metric_calibration.py [--sizes 10000 1000]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from torchvision.transforms.functional import gaussian_blur

from lessons_lib import metrics
from lessons_lib.data import load_fashion_mnist, to_model
from lessons_lib.device import make_generator


def degraded_sets(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    train = load_fashion_mnist("train")
    g = make_generator(seed)
    idx = torch.randperm(len(train), generator=g)[:n]
    x = to_model(train.images[idx])
    noise = torch.randn(x.shape, generator=g)
    few = torch.nonzero(train.labels < 5).squeeze(1)
    few = few[torch.randperm(len(few), generator=g)[:n]]
    return {
        "train (real)": x,
        "blur sigma=1": gaussian_blur(x, kernel_size=7, sigma=1.0),
        "noise std 0.1": (x + 0.1 * noise).clamp(-1, 1),
        "noise std 0.3": (x + 0.3 * noise).clamp(-1, 1),
        "5 classes": to_model(train.images[few]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 1000], help="sample counts n")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print("# metric calibration: n samples vs the 10,000 Fashion-MNIST test images (k = 3)")
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          "the first row's seconds include the test set's features\n")
    print("| set | n | FID | precision | recall | confidence | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        for name, images in degraded_sets(n, args.seed).items():
            start = time.perf_counter()
            r = metrics.evaluate(images, reference="test")
            print(f"| {name} | {n} | {r.fid:.2f} | {r.precision:.3f} | {r.recall:.3f} | {r.confidence:.3f} "
                  f"| {time.perf_counter() - start:.1f} |", flush=True)


if __name__ == "__main__":
    main()
