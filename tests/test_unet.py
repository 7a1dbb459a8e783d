"""The U-Net: shapes, conditioning, gradients and initialisation."""

import math

import pytest
import torch

from lessons_lib.unet import UNet, UNetConfig, count_parameters, timestep_embedding

SMALL = dict(base_channels=16, channel_mults=(1, 2, 2), num_res_blocks=1, num_heads=4, dropout=0.0)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return UNet(UNetConfig(**{**SMALL, **kw})).eval()


@pytest.mark.parametrize("variant", ["attention", "simple"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [28, 32])
def test_output_shape_equals_input_shape(variant, channels, size):
    model = _model(variant=variant, in_channels=channels)
    x = torch.randn(2, channels, size, size)
    assert model(x, torch.tensor([0, 999])).shape == x.shape


def test_odd_stages_with_four_levels():
    model = _model(channel_mults=(1, 2, 2, 2), attention_levels=(False, False, True, True))  # 28 -> 14 -> 7 -> 4
    x = torch.randn(1, 1, 28, 28)
    assert model(x, 5).shape == x.shape


def test_clear_errors_for_inputs_it_cannot_handle():
    model = _model()
    with pytest.raises(ValueError, match=r"expected x of shape \(B, 1, H, W\), got \(2, 3, 28, 28\)"):
        model(torch.randn(2, 3, 28, 28), 1)
    with pytest.raises(ValueError, match="at least 4x4 for 3 levels"):
        model(torch.randn(2, 1, 3, 3), 1)
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.randn(1, 1, 28, 28), 1, torch.tensor([0]))
    cond = _model(num_classes=10)
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 10\]"):
        cond(torch.randn(1, 1, 28, 28), 1, torch.tensor([11]))


def test_config_validation():
    with pytest.raises(ValueError, match="unknown variant 'transformer'"):
        UNetConfig(variant="transformer")
    with pytest.raises(ValueError, match="give one per level"):
        UNetConfig(channel_mults=(1, 2), attention_levels=(True,))
    with pytest.raises(ValueError, match="divisible by num_heads=3"):
        UNetConfig(base_channels=16, num_heads=3)


def test_output_depends_on_t_and_class():
    model = _model(num_classes=10)
    x = torch.randn(2, 1, 28, 28)
    y = torch.tensor([3, 3])
    with torch.no_grad():
        a, b = model(x, torch.tensor([10, 10]), y), model(x, torch.tensor([500, 500]), y)
        c = model(x, torch.tensor([10, 10]), torch.tensor([7, 7]))
        null = model(x, torch.tensor([10, 10]))
        null_explicit = model(x, torch.tensor([10, 10]), torch.tensor([10, 10]))
    assert (a - b).abs().max() > 1e-4 and (a - c).abs().max() > 1e-4
    torch.testing.assert_close(null, null_explicit)  # no label = the learned null class


@pytest.mark.parametrize("variant", ["attention", "simple"])
def test_gradients_reach_every_parameter(variant):
    model = _model(variant=variant, num_classes=4).train()
    x = torch.randn(3, 1, 28, 28)
    model(x, torch.tensor([1, 200, 900]), torch.tensor([0, 2, 4])).pow(2).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_same_seed_same_init():
    a, b, c = _model(seed=1), _model(seed=1), _model(seed=2)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    assert any(not torch.equal(p, r) for p, r in zip(a.parameters(), c.parameters(), strict=True))
    assert count_parameters(a) == count_parameters(b) > 0


def test_timestep_embedding_formula():
    t = torch.tensor([0, 1, 250])
    emb = timestep_embedding(t, 8)
    for i, ti in enumerate(t.tolist()):
        for k in range(4):
            w = math.exp(-math.log(10_000) * k / 4)
            assert emb[i, k].item() == pytest.approx(math.cos(ti * w), abs=1e-5)
            assert emb[i, 4 + k].item() == pytest.approx(math.sin(ti * w), abs=1e-5)


def test_odd_widths_are_clear_errors_and_any_even_width_builds():
    with pytest.raises(ValueError, match="must be even"):
        timestep_embedding(torch.tensor([1]), 7)
    with pytest.raises(ValueError, match="base_channels must be even"):
        UNetConfig(base_channels=33)
    model = _model(base_channels=36, num_heads=4)  # 36 = 4 x 9: GroupNorm still gets groups of >= 4 channels
    assert model(torch.randn(1, 1, 28, 28), 3).shape == (1, 1, 28, 28)
