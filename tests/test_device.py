"""Device choice and reproducible noise."""

import pytest
import torch

from lessons_lib import device as D


def test_same_seed_same_noise_whatever_the_batch_size():
    one = D.randn((1, 1, 28, 28), seed=0)
    eight = D.randn((8, 1, 28, 28), seed=0)
    torch.testing.assert_close(one[0], eight[0], rtol=0, atol=0)
    assert not torch.equal(eight[0], eight[1])  # each sample has its own stream
    # sample i of a batch seeded with s is sample 0 of a batch seeded with s + i
    torch.testing.assert_close(D.randn((1, 3, 4, 4), seed=5)[0], D.randn((4, 3, 4, 4), seed=2)[3], rtol=0, atol=0)


def test_explicit_seed_lists_and_generator_lists():
    a = D.randn((2, 5), seed=[11, 3])
    b = D.randn((2, 5), generator=[D.make_generator(11), D.make_generator(3)])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a[1], D.randn((1, 5), seed=3)[0], rtol=0, atol=0)


def test_single_generator_draws_one_stream():
    g1, g2 = D.make_generator(0), D.make_generator(0)
    torch.testing.assert_close(D.randn((3, 4), generator=g1), torch.randn((3, 4), generator=g2), rtol=0, atol=0)


def test_randn_errors():
    with pytest.raises(ValueError, match="either seed or generator"):
        D.randn((1, 2), seed=0, generator=D.make_generator(0))
    with pytest.raises(ValueError, match="got 3 seeds for a batch of 2"):
        D.randn((2, 2), seed=[1, 2, 3])
    with pytest.raises(ValueError, match="got 1 generators for a batch of 2"):
        D.randn((2, 2), generator=[D.make_generator(0)])
    with pytest.raises(TypeError, match="seed must be an int"):
        D.make_generator(1.5)


def test_randn_dtype_and_device():
    x = D.randn((2, 3), seed=0, dtype=torch.float64, device="cpu")
    assert x.dtype == torch.float64 and x.device.type == "cpu"
    torch.testing.assert_close(x.float(), D.randn((2, 3), seed=0), rtol=0, atol=0)  # drawn in fp32 first


def test_get_device_defaults_and_override(monkeypatch):
    monkeypatch.delenv("LESSONS_DEVICE", raising=False)
    assert D.get_device().type == D.available_devices()[0]
    monkeypatch.setenv("LESSONS_DEVICE", "cpu")
    assert D.get_device() == torch.device("cpu")
    assert D.get_device("cpu") == torch.device("cpu")


def test_get_device_errors(monkeypatch):
    monkeypatch.delenv("LESSONS_DEVICE", raising=False)
    with pytest.raises(ValueError, match="unknown device 'tpu'; allowed: cpu, cuda, mps"):
        D.get_device("tpu")
    monkeypatch.setenv("LESSONS_DEVICE", "banana")
    with pytest.raises(ValueError, match="unknown device 'banana'"):
        D.get_device()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda' is not available here; available: .*cpu"):
            D.get_device("cuda")


def test_autocast_dtype_on_cpu_is_off():
    assert D.autocast_dtype("cpu") is None
    with D.autocast("cpu"):
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == torch.float32


def test_seed_everything_reproduces_global_draws():
    D.seed_everything(7)
    a = torch.rand(3)
    D.seed_everything(7)
    torch.testing.assert_close(a, torch.rand(3), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_noise_equals_cpu_noise_and_autocast_dtype():
    torch.testing.assert_close(D.randn((4, 1, 8, 8), seed=3, device="cuda").cpu(), D.randn((4, 1, 8, 8), seed=3), rtol=0, atol=0)
    assert D.autocast_dtype("cuda") in (torch.bfloat16, torch.float16)
    with D.autocast("cuda"):
        y = torch.ones(8, 8, device="cuda") @ torch.ones(8, 8, device="cuda")
    assert y.dtype == D.autocast_dtype("cuda")
