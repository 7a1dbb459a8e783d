"""The generation API: GenerationConfig, presets, guidance toward / away from a class, per-image seeds,
batching, image-to-image, inpainting, interpolation, and a clear error for every bad value."""

from dataclasses import replace

import pytest
import torch
from torch import nn

from lessons_lib.device import randn, sample_generators
from lessons_lib.guidance import guided_output
from lessons_lib.noising import q_sample
from lessons_lib.pipeline import PRESETS, DiffusionPipeline, GenerationConfig, class_index, load_image, save_image
from lessons_lib.samplers import SAMPLERS, get_sampler, sample
from lessons_lib.schedules import get_schedule
from lessons_lib.train import preset
from lessons_lib.unet import UNet

T = 100
S = get_schedule("cosine", T)


class Elementwise(nn.Module):
    """An analytic stand-in for the U-Net: eps_hat = 0.5 x + (class shift) + 0.001 t, pixel by pixel.

    Only elementwise arithmetic, so an image's numbers never depend on the batch around it: batch and
    seed properties can be checked bit for bit. Has the U-Net's ``config`` and ``class_emb``.
    """

    def __init__(self, num_classes=10):
        super().__init__()
        self.config = replace(preset("tiny").model, num_classes=num_classes)
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.class_emb = nn.Embedding(num_classes + 1, 2) if num_classes else None

    def forward(self, x, t, class_labels=None, class_embedding=None):
        if class_embedding is None and self.class_emb is not None:
            if class_labels is None:
                class_labels = torch.full((len(x),), self.config.num_classes)
            class_embedding = self.class_emb(class_labels)
        shift = 0 if class_embedding is None else (0.3 * class_embedding[:, 0] - 0.2 * class_embedding[:, 1])[:, None, None, None]
        return self.scale * x + shift + 0.001 * t.float()[:, None, None, None]


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return DiffusionPipeline(Elementwise().eval(), S)


@pytest.fixture(scope="module")
def unet_pipe():
    torch.manual_seed(0)
    return DiffusionPipeline(UNet(preset("tiny").model).eval(), S)


def config(**fields):
    return GenerationConfig(**{"sampler": "ddim", "steps": 8, **fields})


# ----------------------------------------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------------------------------------
def test_generate_equals_the_sampler_driven_by_hand_and_reports_what_it_did(unet_pipe):
    c = config(prompt="sneaker", negative="sandal", guidance_scale=2.5, num_images=3, seed=7)
    result = unet_pipe.generate(c, progress=False)
    gens = sample_generators(7, 3)
    x_T = randn((3, 1, 28, 28), generator=gens)
    sampler = get_sampler("ddim", S, 8, "trailing")
    labels, negative = torch.full((3,), class_index("sneaker")), torch.full((3,), class_index("sandal"))
    expected = sample(unet_pipe.model, x_T, sampler, labels, 2.5, gens, progress=False, null_label=negative).images
    assert torch.equal(result.images, expected)
    assert result.labels.tolist() == [7, 7, 7] and result.seeds == [7, 8, 9]
    assert result.steps == 8 and result.nfe == 8 and result.seconds > 0 and result.config.sampler == "ddim"
    images, labels = unet_pipe(3, "sneaker", steps=8, seed=7, progress=False)  # the short form used by the lessons
    assert torch.equal(images, unet_pipe.generate(config(prompt="sneaker", num_images=3, seed=7), progress=False).images)
    by_fields = unet_pipe.generate(prompt=0, num_images=1, seed=7, sampler="ddim", steps=2, progress=False)
    assert torch.equal(by_fields.images, unet_pipe.generate(config(prompt=0, seed=7, steps=2), progress=False).images)
    with pytest.raises(TypeError, match="not both"):
        unet_pipe.generate(c, seed=1)


def test_guided_output_with_a_negative_class_is_the_hand_computed_mix(unet_pipe):
    model = unet_pipe.model
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([30, 60])
    labels, negative, w = torch.tensor([7, 1]), torch.tensor([5, 5]), 3.0
    with torch.no_grad():
        cond, neg, null = model(x, t, labels), model(x, t, negative), model(x, t, torch.tensor([10, 10]))
        torch.testing.assert_close(guided_output(model, x, t, labels, w, null_label=5), neg + w * (cond - neg))
        torch.testing.assert_close(guided_output(model, x, t, labels, w, null_label=negative), neg + w * (cond - neg))
        torch.testing.assert_close(guided_output(model, x, t, labels, w), null + w * (cond - null))
        torch.testing.assert_close(guided_output(model, x, t, labels, 1.0, null_label=5), cond)


def test_negative_class_changes_the_images_and_needs_guidance(pipe):
    base = pipe.generate(config(prompt=0, guidance_scale=3.0), progress=False).images
    away = pipe.generate(config(prompt=0, negative=4, guidance_scale=3.0), progress=False).images
    anything_but = pipe.generate(config(negative="bag", guidance_scale=3.0), progress=False)  # unconditional minus a class
    assert not torch.allclose(base, away) and anything_but.labels is None
    with pytest.raises(ValueError, match="negative class acts through guidance"):
        pipe.generate(config(prompt=0, negative=4), progress=False)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_each_image_is_fixed_by_its_seed_whatever_the_batch(pipe, sampler):
    batch = pipe.generate(config(sampler=sampler, prompt=2, num_images=5, seed=10, guidance_scale=2.0), progress=False)
    alone = pipe.generate(config(sampler=sampler, prompt=2, num_images=1, seed=13, guidance_scale=2.0), progress=False)
    assert torch.equal(batch.images[3], alone.images[0])
    assert not torch.allclose(batch.images[2], batch.images[3])


def test_seeds_hold_for_the_real_network_up_to_float_rounding(unet_pipe):
    batch = unet_pipe.generate(config(sampler="ddpm", prompt=2, num_images=3, seed=10), progress=False).images
    alone = unet_pipe.generate(config(sampler="ddpm", prompt=2, num_images=1, seed=12), progress=False).images
    torch.testing.assert_close(batch[2:], alone, rtol=0, atol=1e-3)  # conv kernels round differently per batch size


def test_generate_batch_runs_compatible_configs_together_with_the_same_images(pipe):
    configs = [config(prompt="bag", num_images=2, seed=0, guidance_scale=2.0),
               config(prompt=3, negative=1, num_images=1, seed=5, guidance_scale=2.0),
               config(num_images=2, seed=9),  # another guidance scale: its own batch
               config(prompt="coat", num_images=1, seed=1, guidance_scale=2.0, sampler="ddpm")]
    results = pipe.generate_batch(configs, progress=False)
    for c, r in zip(configs, results, strict=True):
        assert torch.equal(r.images, pipe.generate(c, progress=False).images)
        assert len(r.images) == c.num_images and r.config.prompt == c.prompt
    assert results[0].seconds == results[1].seconds != results[2].seconds  # the first two ran as one batch
    assert results[2].labels is None and results[1].labels.tolist() == [3]


def test_presets_fill_only_what_the_config_leaves_unset(pipe):
    assert PRESETS["fast"] == ("dpmpp_2m", 10, "karras") and PRESETS["balanced"] == ("dpmpp_2m", 20, "karras")
    fast = pipe.resolve(GenerationConfig(preset="fast"))
    assert (fast.sampler, fast.steps, fast.spacing) == ("dpmpp_2m", 10, "karras")
    high = pipe.resolve(GenerationConfig(preset="high"))
    assert (high.sampler, high.steps, high.spacing) == ("ddpm", T, "trailing")  # 1000 steps, capped at this model's T
    mine = pipe.resolve(GenerationConfig(preset="fast", sampler="ddim", steps=4))
    assert (mine.sampler, mine.steps, mine.spacing) == ("ddim", 4, "trailing")
    mine = pipe.resolve(GenerationConfig(sampler="dpmpp_2m", steps=50))  # no preset runs it: not the Karras grid
    assert mine.spacing == "trailing"
    mine = pipe.resolve(GenerationConfig(preset="high", sampler="dpmpp_2m", steps=20))  # the balanced preset's pair
    assert mine.spacing == "karras"
    mine = pipe.resolve(GenerationConfig(sampler="dpmpp_2m", spacing="leading"))
    assert (mine.sampler, mine.steps, mine.spacing) == ("dpmpp_2m", 20, "leading")


def test_edits_default_to_trailing_steps(pipe):
    """Image-to-image runs the last strength x steps: on trailing steps they start near t = strength x T."""
    source = torch.zeros(1, 28, 28)
    edit = pipe.resolve(GenerationConfig(init_image=source, strength=0.5))
    assert (edit.sampler, edit.steps, edit.spacing) == ("dpmpp_2m", 20, "trailing")
    result = pipe.generate(GenerationConfig(init_image=source, strength=0.5, steps=10, prompt=1), progress=False)
    assert result.steps == 5 and result.nfe == 5
    karras = pipe.resolve(GenerationConfig(init_image=source, strength=0.5, spacing="karras"))
    assert karras.spacing == "karras"  # given explicitly: kept


@pytest.mark.parametrize("name", ["fast", "balanced", "high"])
def test_presets_generate(pipe, name):
    result = pipe.generate(GenerationConfig(preset=name, prompt="dress", num_images=2), progress=False)
    sampler, steps, _ = PRESETS[name]
    assert result.images.shape == (2, 1, 28, 28) and torch.isfinite(result.images).all()
    expected_nfe = get_sampler(sampler, pipe.schedule, min(steps, T), result.config.spacing).nfe
    assert (result.config.sampler, result.steps, result.nfe) == (sampler, min(steps, T), expected_nfe)


def test_nfe_counts_every_network_call(pipe):
    # Heun: 2 per step but the last, and (trailing: from t = T - 1, above SIGMA_MAX) the first
    assert pipe.generate(config(sampler="heun", steps=6), progress=False).nfe == 2 * 6 - 2
    assert pipe.generate(config(sampler="pndm", steps=6), progress=False).nfe == get_sampler("pndm", S, 6, "trailing").nfe


def test_save_and_load_give_the_same_images(unet_pipe, tmp_path):
    unet_pipe.save_pretrained(tmp_path / "m")  # a pipeline built in code: no trainer metadata
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "m", device="cpu")
    assert torch.equal(loaded.schedule.betas, S.betas) and loaded.prediction == unet_pipe.prediction
    c = config(prompt=1, num_images=2)
    assert torch.equal(loaded.generate(c, progress=False).images, unet_pipe.generate(c, progress=False).images)


@pytest.mark.parametrize("schedule", [get_schedule("linear", 50, beta_end=0.05),
                                      get_schedule("sigmoid", 30, zero_terminal_snr=True)])
def test_a_saved_pipeline_keeps_its_schedule_prediction_size_and_classes(schedule, tmp_path):
    torch.manual_seed(0)
    model = UNet(replace(preset("tiny").model, in_channels=3, num_classes=3)).eval()
    pipe = DiffusionPipeline(model, schedule, "v", ("cat", "dog", "owl"), image_size=16)
    loaded = DiffusionPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "m"), device="cpu")
    assert torch.equal(loaded.schedule.betas, schedule.betas) and loaded.schedule.name == schedule.name
    assert (loaded.prediction, loaded.classes, loaded.image_shape) == ("v", ("cat", "dog", "owl"), (3, 16, 16))
    c = config(prompt="owl", num_images=2, steps=4)
    assert torch.equal(loaded.generate(c, progress=False).images, pipe.generate(c, progress=False).images)


def test_a_folder_without_schedule_or_prediction_is_refused(unet_pipe, tmp_path):
    import json

    path = unet_pipe.save_pretrained(tmp_path / "m")
    config_file = path / "config.json"
    config_file.write_text(json.dumps({k: v for k, v in json.loads(config_file.read_text()).items() if k != "pipeline"}))
    with pytest.raises(ValueError, match="has no 'pipeline' section .*the schedule and prediction type are unknown"):
        DiffusionPipeline.from_pretrained(path, device="cpu")


# ----------------------------------------------------------------------------------------------------------
# image-to-image and inpainting
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def photo():
    return torch.rand(1, 28, 28, generator=torch.Generator().manual_seed(3)) * 2 - 1


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_strength_zero_returns_the_input_and_one_ignores_it(pipe, photo, sampler):
    kept = pipe.generate(config(sampler=sampler, init_image=photo, strength=0.0, num_images=2), progress=False)
    assert torch.equal(kept.images, photo.expand(2, 1, 28, 28)) and kept.nfe == 0
    plain = pipe.generate(config(sampler=sampler, prompt=1, num_images=2, seed=4, spacing="trailing"),  # an edit's
                          progress=False).images
    ignored = pipe.generate(config(sampler=sampler, prompt=1, num_images=2, seed=4, init_image=photo, strength=1.0),
                            progress=False).images
    assert torch.equal(ignored, plain)


def test_partial_strength_runs_the_last_steps_from_the_noised_input(pipe, photo):
    result = pipe.generate(config(init_image=photo, strength=0.5, num_images=2, seed=4), progress=False)
    tail = get_sampler("ddim", S, 8, "trailing").timesteps[-4:]
    eps = randn((2, 1, 28, 28), seed=4)
    gens = sample_generators(4, 2)
    randn((2, 1, 28, 28), generator=gens)  # generate draws x_T's noise from each image's generator first
    expected = sample(pipe.model, q_sample(photo.expand(2, 1, 28, 28), int(tail[0]), eps, S),
                      get_sampler("ddim", S, timesteps=tail), torch.full((2,), 10), generator=gens, progress=False)
    torch.testing.assert_close(result.images, expected.images, rtol=0, atol=1e-6)
    assert result.steps == result.nfe == 4 and result.config.strength == 0.5
    assert pipe.resolve(config(init_image=photo)).strength == 0.8  # the default of image-to-image


@pytest.mark.parametrize("sampler, resample", [("ddpm", 1), ("ddim", 1), ("ddpm", 3)])
def test_inpainting_keeps_the_unmasked_pixels_bit_exact(unet_pipe, photo, sampler, resample):
    mask = torch.zeros(28, 28)
    mask[8:20, 5:25] = 1
    result = unet_pipe.generate(config(sampler=sampler, init_image=photo, mask=mask, num_images=2, resample=resample,
                                       jump_length=2), progress=False)
    keep = (mask == 0).expand(2, 1, 28, 28)
    assert torch.equal(result.images[keep], photo.expand(2, 1, 28, 28)[keep])
    assert not torch.allclose(result.images[~keep], photo.expand(2, 1, 28, 28)[~keep])
    assert result.config.strength == 1.0 and result.nfe == 8 + (resample - 1) * 2 * len(range(0, 8 - 2, 2))


# ----------------------------------------------------------------------------------------------------------
# interpolation
# ----------------------------------------------------------------------------------------------------------
def test_interpolating_seeds_starts_and_ends_at_the_two_images(pipe):
    c = config(prompt="shirt", seed=3, guidance_scale=2.0)
    frames = pipe.interpolate(c, 5, to_seed=8, progress=False)
    assert frames.images.shape == (5, 1, 28, 28) and frames.labels.tolist() == [6] * 5
    assert torch.equal(frames.images[0], pipe.generate(c, progress=False).images[0])
    assert torch.equal(frames.images[-1], pipe.generate(replace(c, seed=8), progress=False).images[0])  # ddim: deterministic
    steps = (frames.images[1:] - frames.images[:-1]).flatten(1).norm(dim=1)
    assert steps.max() < 3 * steps.min() + 1e-6  # even steps: no jump between frames


def test_interpolating_classes_keeps_the_noise_and_blends_the_embedding(pipe):
    c = config(prompt="trouser", seed=2, guidance_scale=2.0)
    frames = pipe.interpolate(c, 4, to_class="bag", progress=False)
    assert frames.labels is None
    assert torch.equal(frames.images[0], pipe.generate(c, progress=False).images[0])
    assert torch.equal(frames.images[-1], pipe.generate(replace(c, prompt="bag"), progress=False).images[0])
    ancestral = pipe.interpolate(replace(c, sampler="ddpm"), 3, to_class="bag", progress=False)  # same per-step noise
    assert torch.equal(ancestral.images[0], pipe.generate(replace(c, sampler="ddpm"), progress=False).images[0])


# ----------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, message", [
    ({"sampler": "warp"}, "unknown sampler 'warp'; allowed: ddpm, ddim"),
    ({"preset": "ultra"}, "unknown preset 'ultra'; allowed: fast, balanced, high"),
    ({"spacing": "random"}, "unknown spacing"),
    ({"steps": 0}, "steps must be an int >= 1"),
    ({"num_images": 0}, "num_images must be an int >= 1"),
    ({"seed": 1.5}, "seed must be an int"),
    ({"guidance_scale": -1.0}, "guidance_scale must be a finite number >= 0"),
    ({"eta": -0.5}, "eta must be >= 0"),
    ({"init_image": torch.zeros(1, 28, 28), "strength": 1.2}, r"strength must be a number in \[0, 1\]"),
    ({"mask": torch.ones(28, 28)}, "give init_image too"),
    ({"resample": 0}, "resample must be an int >= 1"),
])
def test_config_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**fields)


@pytest.mark.parametrize("fields, message", [
    ({"steps": T + 1}, r"steps must lie in \[1, 100\]"),
    ({"prompt": "spaceship"}, "unknown class 'spaceship'; allowed: T-shirt/top, Trouser"),
    ({"prompt": 10}, r"class index must lie in \[0, 9\]"),
    ({"negative": "bag"}, "negative class acts through guidance"),
    ({"guidance_scale": 3.0}, "needs a prompt or a negative class"),
    ({"eta": 0.5, "sampler": "ddpm"}, "eta is DDIM's noise"),
    ({"init_image": torch.zeros(1, 14, 14)}, r"init_image must have shape \(1, 28, 28\)"),
    ({"init_image": torch.full((1, 28, 28), 2.0)}, r"init_image values must lie in \[-1, 1\]"),
    ({"init_image": torch.zeros(3, 1, 28, 28), "num_images": 2}, "init_image holds 3 images for num_images=2"),
    ({"init_image": torch.zeros(1, 28, 28), "mask": torch.ones(27, 28)}, r"mask must have shape \(H, W\)"),
])
def test_errors_against_the_model(pipe, fields, message):
    with pytest.raises(ValueError, match=message):
        pipe.generate(config(**fields), progress=False)


def test_unconditional_model_and_interpolation_errors(pipe):
    plain = DiffusionPipeline(Elementwise(num_classes=None).eval(), S)
    for fields in ({"prompt": 1}, {"negative": 1, "guidance_scale": 2.0}):
        with pytest.raises(ValueError, match="this model is unconditional"):
            plain.generate(config(**fields), progress=False)
    with pytest.raises(ValueError, match="to_class needs a class-conditional model"):
        plain.interpolate(config(), 3, to_class=1)
    assert plain.generate(config(num_images=2), progress=False).labels is None
    for kwargs, message in (({"to_seed": 1, "to_class": 2}, "exactly one of to_seed"), ({}, "exactly one of to_seed"),
                            ({"to_class": "bag"}, "give a prompt too")):
        with pytest.raises(ValueError, match=message):
            pipe.interpolate(config(), 3, **kwargs)
    with pytest.raises(ValueError, match="frames must be an int >= 2"):
        pipe.interpolate(config(prompt=1), 1, to_seed=2)


# ----------------------------------------------------------------------------------------------------------
# image files
# ----------------------------------------------------------------------------------------------------------
def test_png_round_trip_resize_and_masks(tmp_path, photo):
    from PIL import Image

    save_image(photo, tmp_path / "a.png")
    back = load_image(tmp_path / "a.png")
    assert back.shape == (1, 28, 28) and (back - photo).abs().max() <= 1 / 127.5  # 8-bit pixels
    Image.new("RGB", (56, 40), (255, 255, 255)).save(tmp_path / "big.png")
    assert load_image(tmp_path / "big.png").shape == (1, 28, 28)
    assert load_image(tmp_path / "big.png", mask=True).all()
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="not an image Pillow can read"):
        load_image(tmp_path / "notes.png")
    with pytest.raises(ValueError, match="no such file"):
        load_image(tmp_path / "missing.png")
