"""Metrics: the Fréchet distance against closed forms, precision/recall on toy clusters, the shipped classifier."""

import shutil

import numpy as np
import pytest
import torch

from lessons_lib import metrics as M
from lessons_lib.checkpoint import CheckpointError
from lessons_lib.cli import main
from lessons_lib.data import ImageDataset, find_fashion_mnist, load_fashion_mnist, to_model

REAL = find_fashion_mnist("train") is not None and find_fashion_mnist("test") is not None
SHIPPED = (M.CLASSIFIER_DIR / "model.safetensors").is_file()
needs_real = pytest.mark.skipif(not REAL, reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
needs_shipped = pytest.mark.skipif(not SHIPPED, reason="no shipped classifier in data/pretrained/fmnist_classifier")


def _spd(d: int, seed: int) -> torch.Tensor:
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


# --------------------------------------------------------------------------------------- Fréchet distance
def test_frechet_distance_diagonal_closed_form():
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(6, generator=g), torch.randn(6, generator=g)
    s1, s2 = torch.rand(6, generator=g) + 0.1, torch.rand(6, generator=g) + 0.1
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * (s1 * s2).sqrt()).sum()
    assert M.frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2)) == pytest.approx(expected.item(), rel=1e-6)


def test_frechet_distance_full_covariance_against_eigvals():
    """Independent route: Tr (C1 C2)^(1/2) = sum of sqrt of the (real, positive) eigenvalues of the non-symmetric C1 C2."""
    d = 12
    c1, c2 = _spd(d, 1), _spd(d, 2)
    mu1, mu2 = torch.zeros(d, dtype=torch.float64), torch.full((d,), 0.5, dtype=torch.float64)
    tr_sqrt = torch.linalg.eigvals(c1 @ c2).sqrt().real.sum()
    expected = ((mu1 - mu2) ** 2).sum() + c1.trace() + c2.trace() - 2 * tr_sqrt
    assert M.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expected.item(), rel=1e-9)
    assert M.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(M.frechet_distance(mu2, c2, mu1, c1), rel=1e-9)


def test_frechet_distance_of_a_gaussian_to_itself_is_zero():
    c = _spd(8, 3)
    mu = torch.arange(8, dtype=torch.float64)
    assert M.frechet_distance(mu, c, mu, c) < 1e-9
    singular = torch.diag(torch.tensor([1.0, 2.0, 0.0, 0.0], dtype=torch.float64))  # rank-deficient: still fine
    assert M.frechet_distance(mu[:4], singular, mu[:4], singular) < 1e-9


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"mu1 \(3,\), mu2 \(4,\)"):
        M.frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4))
    with pytest.raises(ValueError, match=r"cov1 \(3, 2\)"):
        M.frechet_distance(torch.zeros(3), torch.zeros(3, 2), torch.zeros(3), torch.eye(3))


def test_fid_of_features_is_zero_for_same_set_symmetric_and_sees_a_shift():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(20000, 4, generator=g), torch.randn(20000, 4, generator=g)
    assert M.fid(a, a) < 1e-8
    assert M.fid(a, b + 1) == pytest.approx(M.fid(b + 1, a), rel=1e-9)
    assert M.fid(a, b + 1) == pytest.approx(4.0, abs=0.05)  # N(0, I) vs N(1, I) in 4-D: ||mu1 - mu2||^2 = 4
    with pytest.raises(ValueError, match="one D"):
        M.fid(a, b[:, :3])


# ------------------------------------------------------------------------------------ precision / recall
def test_knn_radii_on_a_line():
    points = torch.tensor([[0.0], [1.0], [3.0], [6.0]])
    assert M.knn_radii(points, k=1).tolist() == [1.0, 1.0, 2.0, 3.0]
    assert M.knn_radii(points, k=2).tolist() == [3.0, 2.0, 3.0, 5.0]
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 3\] for 4 points, got 4"):
        M.knn_radii(points, k=4)


def _clusters(n_per: int, clusters, seed: int) -> torch.Tensor:
    """2-D Gaussian blobs (std 0.5) on the corners of a square of side 20: far from one another."""
    g = torch.Generator().manual_seed(seed)
    centres = 20 * torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])[list(clusters)]
    return torch.cat([c + 0.5 * torch.randn(n_per, 2, generator=g) for c in centres])


def test_precision_recall_identical_sets():
    x = _clusters(200, range(4), seed=0)
    assert M.precision_recall(x, x.clone()) == (1.0, 1.0)


def test_precision_recall_far_apart_sets():
    x = _clusters(200, range(4), seed=0)
    assert M.precision_recall(x, x + 100.0) == (0.0, 0.0)


def test_precision_recall_with_half_the_modes():
    """Fakes from 2 of 4 real clusters: they look real (precision ~1), half the real data is missed (recall ~0.5).

    Not exactly 1 and 0.5: k-NN balls around a finite sample cover most of a blob, not all of it (~98% here)."""
    real = _clusters(250, range(4), seed=0)
    fake = _clusters(500, range(2), seed=1)
    precision, recall = M.precision_recall(real, fake)
    assert precision > 0.95
    assert recall == pytest.approx(0.5, abs=0.03)


# ---------------------------------------------------------------------------------------- memorisation
def test_nearest_neighbours_finds_exact_copies():
    g = torch.Generator().manual_seed(0)
    train = torch.rand(1000, 1, 28, 28, generator=g) * 2 - 1
    samples = torch.cat([train[[5, 17]], torch.rand(1, 1, 28, 28, generator=g) * 2 - 1])
    dist, idx = M.nearest_neighbours(samples, train, k=3)
    assert dist.shape == idx.shape == (3, 3)
    assert idx[:2, 0].tolist() == [5, 17] and dist[:2, 0].tolist() == [0.0, 0.0]
    brute = (samples.flatten(1)[:, None] - train.flatten(1)[None]).norm(dim=-1).sort(1)  # independent brute force
    torch.testing.assert_close(dist, brute.values[:, :3])
    assert torch.equal(idx, brute.indices[:, :3])
    with pytest.raises(ValueError, match="share the per-image shape"):
        M.nearest_neighbours(samples, train[:, :, :27])


# ------------------------------------------------------------------------------- classifier and features
def test_augment_flips_and_shifts_without_losing_content():
    x = torch.full((16, 1, 28, 28), -1.0)
    x[:, :, 10:18, 8:20] = torch.rand(16, 1, 8, 12, generator=torch.Generator().manual_seed(0))
    y = M.augment(x, torch.Generator().manual_seed(1))
    torch.testing.assert_close((y + 1).sum((1, 2, 3)), (x + 1).sum((1, 2, 3)))  # object moved, not cut
    assert not torch.equal(x, y)
    same = M.augment(x, torch.Generator().manual_seed(1), max_shift=0)
    assert all(torch.equal(s, a) or torch.equal(s, a.flip(-1)) for s, a in zip(same, x, strict=True))


def test_extract_features_shapes_and_input_checks():
    clf = M.FashionClassifier().eval()
    x = torch.rand(7, 1, 28, 28) * 2 - 1
    feats = M.extract_features(x, clf, batch_size=3)
    assert feats.shape == (7, 128) and (feats >= 0).all()  # after the ReLU
    torch.testing.assert_close(feats, M.extract_features(x, clf, batch_size=500))  # batch size does not matter
    with pytest.raises(ValueError, match="uint8 pixels: use data.to_model"):
        M.extract_features(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), clf)
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\), got \(2, 28, 28\)"):
        M.extract_features(torch.zeros(2, 28, 28), clf)
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\], got values in \[0, 255\]"):
        M.extract_features(torch.full((2, 1, 28, 28), 255.0).index_fill_(0, torch.tensor([0]), 0.0), clf)


@pytest.fixture
def one_thread():
    """Tiny batches: one thread skips OpenMP's start-up and barrier costs (large on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_train_classifier_is_seeded_and_round_trips(tmp_path, one_thread):
    g = torch.Generator().manual_seed(0)
    ds = ImageDataset(torch.randint(0, 256, (48, 1, 28, 28), generator=g, dtype=torch.uint8),
                      torch.randint(0, 10, (48,), generator=g), [str(i) for i in range(10)], "synthetic")
    kw = dict(epochs=1, batch_size=16, train_set=ds, test_set=ds, progress=False)  # 3 steps
    a = M.train_classifier(out_dir=tmp_path / "a", **kw)
    b = M.train_classifier(out_dir=None, **kw)
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    loaded = M.load_classifier(tmp_path / "a")
    x = to_model(ds.images[:8])
    torch.testing.assert_close(loaded(x), a.model(x))
    with pytest.raises(ValueError, match="epochs must be a positive int, got 0"):
        M.train_classifier(epochs=0, train_set=ds, test_set=ds)


def test_load_classifier_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no classifier in .*python -m lessons_lib classifier"):
        M.load_classifier(tmp_path / "nothing")
    M.save_classifier(M.FashionClassifier(widths=(8, 16), feature_dim=16), tmp_path / "small")
    assert M.load_classifier(tmp_path / "small").config["widths"] == [8, 16]
    weights = tmp_path / "small" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="sha256 .* does not match"):
        M.load_classifier(tmp_path / "small")


# ------------------------------------------------------------------------------ the shipped classifier
@needs_shipped
def test_shipped_classifier_loads_and_detects_corruption(tmp_path):
    clf = M.load_classifier()
    assert isinstance(clf, M.FashionClassifier) and not clf.training
    assert M.count_parameters(clf) < 500_000 and (M.CLASSIFIER_DIR / "model.safetensors").stat().st_size < 2e6
    copy = tmp_path / "clf"
    shutil.copytree(M.CLASSIFIER_DIR, copy)
    raw = bytearray((copy / "model.safetensors").read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one flipped bit in the weights
    (copy / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="sha256"):
        M.load_classifier(copy)


@needs_shipped
@needs_real
def test_shipped_classifier_accuracy():
    assert M.accuracy(M.default_classifier(), load_fashion_mnist("test")) >= 0.92


@needs_shipped
@needs_real
def test_evaluate_real_test_images_against_train():
    test = load_fashion_mnist("test")
    real = to_model(test.images[:500])
    good = M.evaluate(real, reference="train", n_reference=2000, labels=test.labels[:500])
    # real vs real at small n: FID a few units (it is biased upwards at small n), degraded images score tens to
    # hundreds (benchmarks/metric_calibration.py); k-NN manifolds of a few thousand points cover ~0.9 of fresh data
    assert good.fid < 15 and good.precision > 0.8 and good.recall > 0.8
    assert sum(good.class_histogram) == 500 and min(good.class_histogram) > 25
    assert good.confidence > 0.85 and good.accuracy > 0.9 and good.n_reference == 2000
    assert "FID" in str(good) and "Ankle boot" in str(good)
    noisy = (real + 0.3 * torch.randn(real.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    bad = M.evaluate(noisy, reference="train", n_reference=2000)
    assert bad.fid > 5 * good.fid and bad.recall < 0.5 * good.recall
    given = M.evaluate(real[:100], reference=to_model(load_fashion_mnist("train").images[:400]), n_reference=300)
    assert given.reference == "given" and given.n_reference == 300 and given.n == 100
    with pytest.raises(ValueError, match="reference must be one of"):
        M.evaluate(real, reference="validation")


@needs_shipped
@needs_real
def test_cli_evaluate_npz(tmp_path, capsys):
    """In-process (``python -m lessons_lib`` itself is covered by test_cli.py): the .npz that `sample` writes."""
    test = load_fashion_mnist("test")
    path = tmp_path / "samples.npz"
    np.savez_compressed(path, images=test.images[:300, 0].numpy(), labels=test.labels[:300].numpy())
    assert main(["evaluate", "--npz", str(path), "--n", "200", "--n-reference", "1000"]) == 0
    out = capsys.readouterr().out
    assert "FID" in out and "precision" in out and "200 samples vs 1000 test images" in out
    assert "accuracy w.r.t. requested labels" in out and "Sneaker" in out
    np.savez_compressed(path, pixels=test.images[:3, 0].numpy())
    assert main(["evaluate", "--npz", str(path)]) == 2
    assert "expected uint8 'images' (N, 28, 28)" in capsys.readouterr().err


@needs_shipped
@needs_real
def test_cli_evaluate_samples_a_checkpoint_per_class(tmp_path, capsys):
    """--checkpoint: a class-conditional model is sampled one class per call, classes 0..9 in turn."""
    from lessons_lib.pipeline import DiffusionPipeline
    from lessons_lib.schedules import get_schedule
    from lessons_lib.unet import UNet, UNetConfig

    torch.manual_seed(0)
    unet = UNet(UNetConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(False, True),
                           num_heads=2, num_classes=10, dropout=0.0))
    DiffusionPipeline(unet.eval(), get_schedule("cosine", 100)).save_pretrained(tmp_path / "tiny")
    assert main(["evaluate", "--checkpoint", str(tmp_path / "tiny"), "--n", "4", "--steps", "2",
                 "--n-reference", "200", "--no-progress"]) == 0  # classes 0, 1, 2, 3: one image each
    out = capsys.readouterr().out
    assert "4 samples of tiny, dpmpp_2m 2 steps" in out and "accuracy w.r.t. requested labels" in out  # balanced preset
    assert "(4 samples vs 200 test images)" in out
    assert main(["evaluate", "--checkpoint", str(tmp_path / "tiny"), "--n", "4", "--preset", "fast", "--sampler", "ddim",
                 "--n-reference", "200", "--no-progress"]) == 0
    assert "4 samples of tiny, ddim 10 steps" in capsys.readouterr().out  # the steps from --preset, the sampler given
