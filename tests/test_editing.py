"""Editing building blocks: slerp, noising to a level, the strength -> steps rule, masks, the RePaint hook, and
conditioning the U-Net on a class embedding instead of a label."""

import math
from dataclasses import replace

import pytest
import torch

from lessons_lib.device import make_generator
from lessons_lib.editing import RESAMPLING_SAMPLERS, Inpainter, check_mask, embedding_model, img2img_steps, noise_to, slerp
from lessons_lib.noising import q_sample
from lessons_lib.samplers import SAMPLERS, get_sampler, sample
from lessons_lib.schedules import get_schedule
from lessons_lib.train import preset
from lessons_lib.unet import UNet

S = get_schedule("cosine", 100)


# ----------------------------------------------------------------------------------------------------------
# slerp
# ----------------------------------------------------------------------------------------------------------
def test_slerp_endpoints_are_the_inputs_bit_for_bit():
    g = make_generator(0)
    a, b = torch.randn(1, 28, 28, generator=g), torch.randn(1, 28, 28, generator=g)
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    frames = slerp(a, b, torch.linspace(0, 1, 7))
    assert frames.shape == (7, 1, 28, 28) and torch.equal(frames[0], a) and torch.equal(frames[-1], b)


def test_slerp_keeps_gaussian_noise_at_its_norm_where_a_straight_line_does_not():
    D = 784
    g = make_generator(1)
    a, b = torch.randn(D, generator=g), torch.randn(D, generator=g)
    norms = slerp(a, b, torch.linspace(0, 1, 11)).norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, math.sqrt(D)), rtol=0.1)
    assert ((a + b) / 2).norm() < 0.8 * math.sqrt(D)  # the contrast: lerp half-way is ~ sqrt(D / 2)


def test_slerp_closed_form_on_the_unit_circle():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    for w in (0.25, 0.5, 0.9):  # the point at angle w * 90 degrees
        angle = w * math.pi / 2
        torch.testing.assert_close(slerp(a, b, w), torch.tensor([math.cos(angle), math.sin(angle)]))
    torch.testing.assert_close(slerp(a, 2 * a, 0.5), 1.5 * a)  # parallel: a straight line


def test_slerp_errors():
    with pytest.raises(ValueError, match="same shape"):
        slerp(torch.zeros(3), torch.zeros(4), 0.5)
    with pytest.raises(ValueError, match="opposite directions"):
        slerp(torch.ones(3), -torch.ones(3), 0.5)
    with pytest.raises(ValueError, match="1-D"):
        slerp(torch.ones(3), torch.ones(3), torch.zeros(2, 2))


# ----------------------------------------------------------------------------------------------------------
# image-to-image pieces
# ----------------------------------------------------------------------------------------------------------
def test_noise_to_is_q_sample_at_that_level_and_the_identity_at_level_one():
    g = make_generator(2)
    x0, eps = torch.rand(2, 1, 4, 4, generator=g) * 2 - 1, torch.randn(2, 1, 4, 4, generator=g)
    for t in (0, 37, 99):
        torch.testing.assert_close(noise_to(x0, float(S.alpha_bar[t]), eps), q_sample(x0, t, eps, S))
    assert torch.equal(noise_to(x0, 1.0, eps), x0)


def test_img2img_steps_rounds_strength_times_steps_and_rejects_bad_strength():
    assert [img2img_steps(10, s) for s in (0, 0.04, 0.05 + 1e-9, 0.3, 0.7, 1)] == [0, 0, 1, 3, 7, 10]
    for bad in (-0.1, 1.5, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match=r"strength must be a number in \[0, 1\]"):
            img2img_steps(10, bad)


def test_check_mask_shapes_and_values():
    image = torch.zeros(3, 1, 8, 8)
    for shape in ((8, 8), (1, 8, 8), (1, 1, 8, 8), (3, 1, 8, 8)):
        m = check_mask(torch.ones(shape), image)
        assert m.dtype == torch.bool and torch.broadcast_shapes(m.shape, image.shape) == image.shape
    for shape in ((7, 8), (2, 1, 8, 8), (1, 1, 1, 8, 8), (8,)):
        with pytest.raises(ValueError, match=r"mask must have shape \(H, W\)"):
            check_mask(torch.ones(shape), image)
    with pytest.raises(ValueError, match="0 .keep the pixel. or 1"):
        check_mask(torch.full((8, 8), 0.5), image)
    with pytest.raises(TypeError, match="mask must be a tensor"):
        check_mask([[1]], image)


# ----------------------------------------------------------------------------------------------------------
# the RePaint hook, driven by samplers.sample
# ----------------------------------------------------------------------------------------------------------
def shrink(x, t, labels=None):
    """A stand-in denoiser: eps_hat = 0.5 x (elementwise, so every pixel stays independent)."""
    return 0.5 * x


def inpaint_setup(seed=3):
    g = make_generator(seed)
    x0 = torch.rand(2, 1, 8, 8, generator=g) * 2 - 1
    mask = torch.zeros(1, 8, 8)
    mask[:, 2:6, 3:7] = 1
    return x0, mask, torch.randn(2, 1, 8, 8, generator=make_generator(9))


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_inpainting_equals_a_hand_written_repaint_loop_and_keeps_known_pixels_exact(name):
    x0, mask, x_T = inpaint_setup()
    sampler = get_sampler(name, S, 10, "leading")
    gens = lambda: [make_generator(s) for s in (5, 6)]  # noqa: E731
    g = gens()
    got = sample(shrink, x_T, sampler, generator=g, progress=False, on_step=Inpainter(shrink, sampler, x0, mask, g)).images

    g, x = gens(), x_T  # Lugmayr et al. 2022, Algorithm 1 with U = 1: step, then put back the noised known pixels
    for i, t in enumerate(sampler.timesteps.tolist()):
        x = sampler.step(shrink(x, t), i, x, generator=g).prev
        ab = sampler.alpha_bars(i)[1]
        z = torch.stack([torch.randn(1, 8, 8, generator=gi) for gi in g]) if ab < 1 else 0
        x = mask * x + (1 - mask) * (ab**0.5 * x0 + (1 - ab) ** 0.5 * z)
    torch.testing.assert_close(got, x.clamp(-1, 1), rtol=0, atol=1e-6)
    keep = ~mask.bool().expand_as(x0)
    assert torch.equal(got[keep], x0[keep]) and not torch.allclose(got[~keep], x0[~keep])


@pytest.mark.parametrize("name, resample", [(n, 1) for n in SAMPLERS] + [(n, 3) for n in RESAMPLING_SAMPLERS])
def test_every_sampler_inpaints_with_known_pixels_exact(name, resample):
    x0, mask, x_T = inpaint_setup()
    sampler = get_sampler(name, S, 7, "trailing")
    g = [make_generator(s) for s in (5, 6)]
    hook = Inpainter(shrink, sampler, x0, mask, g, jump_length=2, resample=resample)
    out = sample(shrink, x_T, sampler, generator=g, progress=False, on_step=hook).images
    keep = ~mask.bool().expand_as(x0)
    assert torch.equal(out[keep], x0[keep]) and torch.isfinite(out).all() and not torch.allclose(out[~keep], x0[~keep])


def evaluated_times(sampler, jump_length, resample):
    x0, mask, x_T = inpaint_setup()
    times = []
    model = lambda x, t, labels=None: times.append(int(t[0])) or shrink(x, t)  # noqa: E731
    g = [make_generator(s) for s in (5, 6)]
    hook = Inpainter(model, sampler, x0, mask, g, jump_length=jump_length, resample=resample)
    out = sample(model, x_T, sampler, generator=g, progress=False, on_step=hook).images
    keep = ~mask.bool().expand_as(x0)
    assert torch.equal(out[keep], x0[keep])
    return times


@pytest.mark.parametrize("n, jump_length, resample", [(10, 1, 2), (20, 5, 3), (20, 10, 10), (12, 5, 4)])
def test_resampling_evaluates_the_model_at_the_times_of_diffusers_repaint_schedule(n, jump_length, resample):
    RePaintScheduler = pytest.importorskip("diffusers").RePaintScheduler
    ref = RePaintScheduler(num_train_timesteps=100)
    ref.set_timesteps(n, jump_length=jump_length, jump_n_sample=resample)
    ts = ref.timesteps.tolist()
    expected = [t for k, t in enumerate(ts) if k == 0 or t < ts[k - 1]]  # the denoising moves; the rest re-noise
    assert evaluated_times(get_sampler("ddpm", S, n, "leading"), jump_length, resample) == expected


def test_resample_one_is_plain_inpainting():
    sampler = get_sampler("ddim", S, 10)
    x0, mask, x_T = inpaint_setup()
    runs = [sample(shrink, x_T, sampler, progress=False,
                   on_step=Inpainter(shrink, sampler, x0, mask, [make_generator(1), make_generator(2)], jump_length=j,
                                     resample=1)).images for j in (1, 3, 10)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_inpainter_errors():
    x0, mask, _ = inpaint_setup()
    sampler = get_sampler("ddim", S, 10)
    for name in ("jump_length", "resample"):
        with pytest.raises(ValueError, match=f"{name} must be an int >= 1"):
            Inpainter(shrink, sampler, x0, mask, **{name: 0})
    with pytest.raises(ValueError, match="mask must have shape"):
        Inpainter(shrink, sampler, x0, torch.ones(4, 4))
    for name in ("dpmpp_2m", "heun", "pndm"):  # they remember past steps or stages: a step cannot run twice
        with pytest.raises(ValueError, match="sampler without memory between steps: ddpm, ddim, euler, euler_ancestral"):
            Inpainter(shrink, get_sampler(name, S, 10), x0, mask, resample=2)


# ----------------------------------------------------------------------------------------------------------
# class embeddings instead of labels
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet(preset("tiny").model).eval()


def test_unet_with_the_looked_up_embedding_equals_the_unet_with_the_label(unet):
    x, t, labels = torch.randn(3, 1, 8, 8, generator=make_generator(4)), torch.tensor([5, 50, 99]), torch.tensor([0, 7, 10])
    with torch.no_grad():
        assert torch.equal(unet(x, t, class_embedding=unet.class_emb(labels)), unet(x, t, labels))
        table = unet.class_emb.weight
        assert torch.equal(embedding_model(unet, table)(x, t, labels), unet(x, t, labels))
        blend = unet(x, t, class_embedding=slerp(table[0], table[7], torch.tensor([0.5, 0.5, 0.5])))
    assert not torch.allclose(blend, unet(x, t, labels))


def test_class_embedding_errors(unet):
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    emb = unet.class_emb(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="class_labels or class_embedding, not both"):
        unet(x, t, torch.tensor([0, 1]), class_embedding=emb)
    with pytest.raises(ValueError, match=r"class_embedding must have shape \(B, D\) = \(2, 32\)"):
        unet(x, t, class_embedding=emb[:, :5])
    plain = UNet(replace(preset("tiny").model, num_classes=None))
    with pytest.raises(ValueError, match="unconditional"):
        plain(x, t, class_embedding=emb)
