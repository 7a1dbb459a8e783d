"""How good: FID and precision/recall in the feature space of a small Fashion-MNIST classifier.

FID (Heusel et al. 2017) fits a Gaussian to the features of real and of generated images and measures
the Fréchet distance between the two. Precision/recall (Kynkäänniemi et al. 2019, arXiv:1904.06991)
ask two separate questions of the same features: what fraction of the samples land on the real data's
manifold (quality), and what fraction of the real data lands on the samples' manifold (coverage).

The features come from :class:`FashionClassifier`, a ~0.24M-parameter CNN that the project trains with
``python -m lessons_lib classifier`` and ships in ``data/pretrained/fmnist_classifier`` — not from
Inception-v3, which was trained on ImageNet photos, needs a download and knows nothing about 28x28
grey clothes. Numbers are therefore comparable within this course, not with published FIDs.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .checkpoint import CONFIG, WEIGHTS, CheckpointError, atomic_write, clean_state_dict, load_state, read_verified, sha256_file
from .config import PRETRAINED_DIR
from .data import FASHION_MNIST_CLASSES, ImageDataset, load_fashion_mnist, to_model
from .device import get_device, make_generator

CLASSIFIER_DIR = PRETRAINED_DIR / "fmnist_classifier"
REFERENCES = ("test", "train")


# ---------------------------------------------------------------------------------------------------
# The feature extractor: a small CNN trained on Fashion-MNIST
# ---------------------------------------------------------------------------------------------------
class FashionClassifier(nn.Module):
    """conv-maxpool-BN-ReLU blocks (28 -> 14 -> 7 -> 3), a ``feature_dim`` ReLU layer, then 10 logits.

    Input: (B, 1, 28, 28) in [-1, 1]. ``features(x)`` is the penultimate layer, the space the metrics use.
    """

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128), feature_dim: int = 128, dropout: float = 0.3,
                 num_classes: int = 10):
        super().__init__()
        if not widths or any(w < 1 for w in widths) or len(widths) > 4:
            raise ValueError(f"widths must be 1 to 4 positive ints (one per 2x pooling), got {widths!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.config = {"widths": list(widths), "feature_dim": feature_dim, "dropout": dropout, "num_classes": num_classes}
        layers, c = [], 1
        for w in widths:
            # pool first: BN and ReLU then touch a quarter of the pixels (25% faster training on a CPU)
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c = w
        side = 28 // 2 ** len(widths)
        self.body = nn.Sequential(*layers)
        self.embed = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c * side * side, feature_dim), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate features (B, feature_dim)."""
        return self.embed(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def augment(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random horizontal flips and integer shifts of up to ``max_shift`` pixels (background -1 fills the gap)."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy, dx = (torch.randint(0, 2 * max_shift + 1, (b,), generator=generator) for _ in range(2))
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
    return padded[torch.arange(b)[:, None, None], 0, rows, cols].unsqueeze(1)


@torch.no_grad()
def accuracy(classifier: nn.Module, dataset: ImageDataset, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``classifier`` on ``dataset``."""
    logits = _logits(classifier, to_model(dataset.images), batch_size)
    return (logits.argmax(1) == dataset.labels).float().mean().item()


@dataclass
class ClassifierResult:
    model: FashionClassifier
    test_accuracy: float
    wall_time_s: float
    out_dir: Path | None
    history: list[dict] = field(default_factory=list)


def train_classifier(epochs: int = 20, seed: int = 0, out_dir: str | Path | None = CLASSIFIER_DIR, batch_size: int = 128,
                     lr: float = 3e-3, weight_decay: float = 1e-2, progress: bool = True, device: str | None = "cpu",
                     train_set: ImageDataset | None = None, test_set: ImageDataset | None = None) -> ClassifierResult:
    """Train :class:`FashionClassifier` on the Fashion-MNIST train split and report test accuracy.

    AdamW with a one-cycle schedule (warm-up, then cosine decay), flips and small shifts; every random
    draw (initial weights, batch order, augmentation, dropout) comes from ``seed``. Writes
    ``model.safetensors`` + ``config.json`` into ``out_dir`` atomically (``None``: keep it in memory).
    """
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    device = get_device(device)
    train_set = train_set if train_set is not None else load_fashion_mnist("train")
    test_set = test_set if test_set is not None else load_fashion_mnist("test")
    torch.manual_seed(seed)  # initial weights and dropout masks
    model = FashionClassifier().to(device)
    steps_per_epoch = len(train_set) // batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.2)
    g = make_generator(seed)
    images = to_model(train_set.images)
    history, start = [], time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(images), generator=g)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        total_loss = 0.0
        for k in bar:
            idx = perm[k * batch_size:(k + 1) * batch_size]
            x = augment(images[idx], g).to(device)
            loss = F.cross_entropy(model(x), train_set.labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item()
            if k % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        model.eval()
        acc = accuracy(model, test_set)
        history.append({"epoch": epoch + 1, "train_loss": total_loss / steps_per_epoch, "test_accuracy": acc,
                        "seconds": round(time.perf_counter() - start, 1)})
        if progress:
            print(f"epoch {epoch + 1}/{epochs}: train loss {history[-1]['train_loss']:.4f}, test accuracy {acc:.2%}, "
                  f"{history[-1]['seconds']:.0f} s")
    wall = time.perf_counter() - start
    result = ClassifierResult(model.cpu().eval(), history[-1]["test_accuracy"], wall, None, history)
    if out_dir is not None:
        train_cfg = {"epochs": epochs, "seed": seed, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                     "schedule": "one-cycle (pct_start 0.2)", "augmentation": "hflip p=0.5, shift <= 2 px",
                     "device": str(device), "torch_threads": torch.get_num_threads()}
        result.out_dir = save_classifier(model, out_dir, {"train": train_cfg, "test_accuracy": result.test_accuracy,
                                                          "wall_time_s": round(wall, 1), "history": history})
    return result


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_classifier(model: FashionClassifier, out_dir: str | Path, metadata: dict | None = None) -> Path:
    """``out_dir/model.safetensors`` + ``config.json`` (architecture, sha256 of the weights, metadata)."""
    out_dir = Path(out_dir)
    state = clean_state_dict(model.state_dict())
    atomic_write(out_dir / WEIGHTS, lambda tmp: save_file(state, str(tmp)))
    config = {"model": model.config, "num_parameters": count_parameters(model), "lessons_lib_version": __version__,
              "torch_version": torch.__version__, "weights_sha256": sha256_file(out_dir / WEIGHTS), **(metadata or {})}
    atomic_write(out_dir / CONFIG, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    return out_dir


def load_classifier(path: str | Path = CLASSIFIER_DIR, device: str | torch.device = "cpu") -> FashionClassifier:
    """The classifier saved by :func:`save_classifier`, in eval mode; checks the sha256, keys and shapes."""
    path = Path(path)
    if not (path / CONFIG).is_file() and not (path / WEIGHTS).is_file():
        raise CheckpointError(f"no classifier in {path}: train one with "
                              f"`python -m lessons_lib classifier --out {path}`")
    config, state = read_verified(path)
    weights = path / WEIGHTS
    try:
        model = FashionClassifier(**config["model"])
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{path / CONFIG}: 'model' does not describe a FashionClassifier ({err})") from err
    try:
        load_state(model, state)
    except CheckpointError as err:
        raise CheckpointError(f"{weights}: {err}") from err
    return model.to(device).eval()


@lru_cache(maxsize=1)
def default_classifier() -> FashionClassifier:
    """The shipped classifier, loaded once per process."""
    return load_classifier(CLASSIFIER_DIR)


# ---------------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------------
def _check_images(images: torch.Tensor, name: str = "images") -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 28, 28):
        raise ValueError(f"{name} must have shape (B, 1, 28, 28), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be float in [-1, 1], got {images.dtype} (uint8 pixels: use data.to_model first)")
    if len(images) == 0:
        raise ValueError(f"{name} is empty")
    lo, hi = images.min().item(), images.max().item()
    if lo < -1.01 or hi > 1.01:
        raise ValueError(f"{name} must lie in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]")


@torch.no_grad()
def _batched(fn, images: torch.Tensor, classifier: nn.Module, batch_size: int) -> torch.Tensor:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    _check_images(images)
    classifier.eval()
    device = next(classifier.parameters()).device
    return torch.cat([fn(images[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)])


def _logits(classifier: FashionClassifier, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    return _batched(classifier, images, classifier, batch_size)


def extract_features(images: torch.Tensor, classifier: FashionClassifier | None = None, batch_size: int = 500) -> torch.Tensor:
    """Penultimate features (B, feature_dim) of float images (B, 1, 28, 28) in [-1, 1]; default: the shipped classifier."""
    classifier = classifier if classifier is not None else default_classifier()
    return _batched(classifier.features, images, classifier, batch_size)


# ---------------------------------------------------------------------------------------------------
# FID
# ---------------------------------------------------------------------------------------------------
def _as_float64(x) -> torch.Tensor:
    return torch.as_tensor(x).detach().to("cpu", torch.float64)


def _sqrt_psd(c: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix (tiny negative eigenvalues -> 0)."""
    w, v = torch.linalg.eigh((c + c.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """d^2 = ||mu1 - mu2||^2 + Tr(C1 + C2 - 2 (C1 C2)^(1/2)) between two Gaussians (Heusel et al. 2017, arXiv:1706.08500).

    Tr (C1 C2)^(1/2) = Tr (C1^(1/2) C2 C1^(1/2))^(1/2): the same eigenvalues, but a symmetric PSD matrix,
    so ``eigh`` gives it stably in float64 (no scipy ``sqrtm``, no complex round-off).
    """
    mu1, mu2, cov1, cov2 = (_as_float64(a) for a in (mu1, mu2, cov1, cov2))
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    if d < 1 or mu2.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(f"need mu1, mu2 of shape (D,) and cov1, cov2 of shape (D, D) with one D; got mu1 "
                         f"{tuple(mu1.shape)}, mu2 {tuple(mu2.shape)}, cov1 {tuple(cov1.shape)}, cov2 {tuple(cov2.shape)}")
    s1 = _sqrt_psd(cov1)
    inner = torch.linalg.eigvalsh(s1 @ cov2 @ s1)
    tr_sqrt = inner.clamp(min=0).sqrt().sum()
    value = (mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * tr_sqrt
    return max(value.item(), 0.0)  # d^2 >= 0; round-off can dip a hair below for identical inputs


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    f = _as_float64(features)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got {tuple(f.shape)}")
    return f.mean(0), torch.cov(f.T)


def fid(real_features: torch.Tensor, fake_features: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D) and (M, D)."""
    if real_features.ndim != 2 or fake_features.ndim != 2 or real_features.shape[1] != fake_features.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D) with one D, got {tuple(real_features.shape)} "
                         f"and {tuple(fake_features.shape)}")
    return frechet_distance(*gaussian_stats(real_features), *gaussian_stats(fake_features))


# ---------------------------------------------------------------------------------------------------
# Precision and recall (Kynkäänniemi et al. 2019)
# ---------------------------------------------------------------------------------------------------
def knn_radii(features: torch.Tensor, k: int = 3, chunk: int = 1000) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point: the radius of its ball (paper eq. 1)."""
    if not isinstance(k, int) or not 1 <= k < len(features):
        raise ValueError(f"k must be an int in [1, {len(features) - 1}] for {len(features)} points, got {k!r}")
    f = features.float()
    # k + 1 smallest, the first being the point itself (distance 0)
    return torch.cat([torch.cdist(f[i:i + chunk], f).topk(k + 1, largest=False).values[:, k]
                      for i in range(0, len(f), chunk)])


def manifold_coverage(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, chunk: int = 1000) -> float:
    """Fraction of ``queries`` inside at least one ball B(support_j, radii_j) (paper eq. 1 and 2)."""
    q, s = queries.float(), support.float()
    inside = [(torch.cdist(q[i:i + chunk], s) <= radii[None, :]).any(1) for i in range(0, len(q), chunk)]
    return torch.cat(inside).float().mean().item()


def precision_recall(real_features: torch.Tensor, fake_features: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall: precision = share of fakes on the real manifold, recall = share of reals
    on the fake manifold; each manifold is the union of balls reaching a point's k-th nearest neighbour."""
    if real_features.ndim != 2 or fake_features.ndim != 2 or real_features.shape[1] != fake_features.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D) with one D, got {tuple(real_features.shape)} "
                         f"and {tuple(fake_features.shape)}")
    precision = manifold_coverage(fake_features, real_features, knn_radii(real_features, k))
    recall = manifold_coverage(real_features, fake_features, knn_radii(fake_features, k))
    return precision, recall


# ---------------------------------------------------------------------------------------------------
# Everything at once, and "are the samples copies?"
# ---------------------------------------------------------------------------------------------------
@dataclass
class Evaluation:
    """The scores of one set of samples against one set of real images."""

    fid: float
    precision: float
    recall: float
    class_histogram: list[int]  # how many samples the classifier puts in each class
    confidence: float  # mean max softmax probability over the samples
    n: int
    n_reference: int
    reference: str
    accuracy: float | None = None  # share of samples classified as the class they were generated for
    classes: tuple[str, ...] = FASHION_MNIST_CLASSES

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"FID {self.fid:.3f}   precision {self.precision:.3f}   recall {self.recall:.3f}   "
                 f"({self.n} samples vs {self.n_reference} {self.reference} images)",
                 f"classifier confidence {self.confidence:.3f}"
                 + (f"   accuracy w.r.t. requested labels {self.accuracy:.3f}" if self.accuracy is not None else "")]
        width = max(len(c) for c in self.classes)
        for name, count in zip(self.classes, self.class_histogram, strict=True):
            share = count / max(1, self.n)
            lines.append(f"  {name:<{width}} {count:6d}  {share:6.1%}  {'#' * round(40 * share)}")
        return "\n".join(lines)


@lru_cache(maxsize=4)
def _reference_features(split: str, n: int | None, classifier: FashionClassifier) -> torch.Tensor:
    ds = load_fashion_mnist(split)
    idx = reference_indices(len(ds), n)
    return extract_features(to_model(ds.images[idx]), classifier)


def reference_indices(size: int, n: int | None, seed: int = 0) -> torch.Tensor:
    """All of ``range(size)``, or a fixed seeded subset of ``n`` (so every run compares with the same images)."""
    if n is None or n == size:
        return torch.arange(size)
    if not isinstance(n, int) or not 2 <= n <= size:
        raise ValueError(f"n_reference must be None or an int in [2, {size}], got {n!r}")
    return torch.randperm(size, generator=make_generator(seed))[:n].sort().values


def evaluate(images: torch.Tensor, reference: str | torch.Tensor = "test", classifier: FashionClassifier | None = None,
             n_reference: int | None = None, k: int = 3, labels: torch.Tensor | None = None) -> Evaluation:
    """FID, precision/recall (k-NN manifolds), class histogram and mean confidence of ``images`` (B, 1, 28, 28) in [-1, 1].

    ``reference``: ``"test"`` / ``"train"`` (Fashion-MNIST, all of it or a seeded subset of ``n_reference``;
    features are cached per process) or a tensor of real images in the same format. ``labels``: the classes
    the samples were generated for, to also report how often the classifier agrees. FID is biased
    upwards at small n: compare numbers only at equal sample counts (see the classifier's model card).
    """
    if len(images) <= k:
        raise ValueError(f"evaluate needs more than k = {k} images (precision and recall use each image's {k} nearest "
                         f"neighbours; FID needs a covariance), got {len(images)}; use 1,000 to compare with the course")
    classifier = classifier if classifier is not None else default_classifier()
    if isinstance(reference, str):
        if reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES} or a tensor of real images, got {reference!r}")
        real, name = _reference_features(reference, n_reference, classifier), reference
    elif isinstance(reference, torch.Tensor):
        idx = reference_indices(len(reference), n_reference)
        real, name = extract_features(reference[idx], classifier), "given"
    else:
        raise TypeError(f"reference must be 'test', 'train' or a tensor, got {type(reference).__name__}")
    fake = extract_features(images, classifier)
    with torch.no_grad():
        probs = classifier.head(fake.to(next(classifier.parameters()).device)).softmax(1).cpu()
    confidence, predicted = probs.max(1)
    agreement = None
    if labels is not None:
        labels = torch.as_tensor(labels).long().cpu()
        if labels.shape != (len(images),):
            raise ValueError(f"labels must have shape ({len(images)},), got {tuple(labels.shape)}")
        if len(labels) and (labels.min() < 0 or labels.max() >= probs.shape[1]):
            raise ValueError(f"labels must lie in [0, {probs.shape[1] - 1}], got [{int(labels.min())}, {int(labels.max())}]")
        agreement = (predicted == labels).float().mean().item()
    precision, recall = precision_recall(real, fake, k)
    return Evaluation(fid=fid(real, fake), precision=precision, recall=recall,
                      class_histogram=torch.bincount(predicted, minlength=probs.shape[1]).tolist(),
                      confidence=confidence.mean().item(), n=len(images), n_reference=len(real), reference=name,
                      accuracy=agreement)


@torch.no_grad()
def nearest_neighbours(samples: torch.Tensor, train_images: torch.Tensor, k: int = 1, chunk: int = 256
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """L2 distances (B, k) in pixel space and indices (B, k) of each sample's k nearest training images.

    A memorising model shows distances near 0. ``cdist`` ranks candidates with the fast matrix-product
    formula; the k winners' distances are then recomputed exactly, so an exact copy reports 0.
    """
    if samples.ndim < 2 or train_images.ndim < 2 or samples.shape[1:] != train_images.shape[1:]:
        raise ValueError(f"samples and train_images must share the per-image shape, got {tuple(samples.shape)} "
                         f"and {tuple(train_images.shape)}")
    if not isinstance(k, int) or not 1 <= k <= len(train_images):
        raise ValueError(f"k must be an int in [1, {len(train_images)}], got {k!r}")
    s, t = samples.flatten(1).float(), train_images.flatten(1).float()
    dists, indices = [], []
    for i in range(0, len(s), chunk):
        q = s[i:i + chunk]
        idx = torch.cdist(q, t).topk(k, largest=False).indices  # (b, k)
        exact = (q[:, None, :] - t[idx]).norm(dim=-1)  # the same k, exactly
        exact, order = exact.sort(1)
        dists.append(exact)
        indices.append(idx.gather(1, order))
    return torch.cat(dists), torch.cat(indices)
