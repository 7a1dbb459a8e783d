"""Latent diffusion: the autoencoder's trainer (exact resume, its scale factor, a folder that always loads), the
diffusion trainer on latents, and the pipeline that samples latents and decodes them, against the same steps by hand."""

import json
from dataclasses import replace

import pytest
import torch

from lessons_lib.autoencoder import Autoencoder, AutoencoderConfig, encode_images, load_autoencoder, save_autoencoder
from lessons_lib.autoencoder_train import AutoencoderTrainConfig, train_autoencoder
from lessons_lib.checkpoint import AUTOENCODER_WEIGHTS, CheckpointError
from lessons_lib.data import ImageDataset, to_model
from lessons_lib.device import randn, sample_generators
from lessons_lib.editing import downsample_mask
from lessons_lib.pipeline import DiffusionPipeline, GenerationConfig
from lessons_lib.samplers import get_sampler, sample
from lessons_lib.train import preset, train

AE = AutoencoderConfig(base_channels=8, channel_mults=(1, 2), latent_channels=2)  # 16x16 images -> 2x8x8 latents


def _dataset(n=48, size=16):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)
    return ImageDataset(images, torch.randint(0, 10, (n,), generator=g), [str(i) for i in range(10)], "synthetic")


def _ae_cfg(out_dir, **kw):
    return AutoencoderTrainConfig(**{"model": replace(AE), "batch_size": 8, "lr": 3e-3, "warmup_steps": 2,
                                     "lr_schedule": "constant", "max_steps": 6, "out_dir": str(out_dir),
                                     "checkpoint_every": 100, "log_every": 1, "scale_images": 32, **kw})


def _same(a: torch.nn.Module, b: torch.nn.Module):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


@pytest.fixture(scope="module")
def autoencoder_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ae")
    train_autoencoder(_ae_cfg(out, max_steps=20), _dataset(), progress=False)
    return out


@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory, autoencoder_dir):
    out = tmp_path_factory.mktemp("ldm")
    model = replace(preset("tiny").model, in_channels=AE.latent_channels)
    train(preset("tiny", model=model, autoencoder=str(autoencoder_dir), out_dir=str(out), max_steps=4), _dataset(),
          progress=False)
    return out


# ----------------------------------------------------------------------------------------------------------
# the autoencoder's trainer
# ----------------------------------------------------------------------------------------------------------
def test_autoencoder_resume_is_exact_and_the_folder_loads(tmp_path):
    ds = _dataset()
    straight = train_autoencoder(_ae_cfg(tmp_path / "a"), ds, progress=False)
    train_autoencoder(_ae_cfg(tmp_path / "b", max_steps=3), ds, progress=False)
    resumed = train_autoencoder(_ae_cfg(tmp_path / "b"), ds, progress=False)
    assert resumed.step == straight.step == 6 and [s for s, _ in resumed.history] == list(range(1, 7))
    _same(straight.model, resumed.model)
    loaded = load_autoencoder(tmp_path / "b")
    _same(loaded, resumed.model)
    assert loaded.config.scale_factor == resumed.model.config.scale_factor
    saved = json.loads((tmp_path / "b" / "config.json").read_text())
    assert saved["step"] == 6 and saved["train_autoencoder"]["max_steps"] == 6


def test_the_saved_scale_factor_is_one_over_the_std_of_the_fixed_images_latents(autoencoder_dir):
    model = load_autoencoder(autoencoder_dir)
    ds = _dataset()
    idx = torch.randperm(len(ds.images), generator=torch.Generator().manual_seed(0))[:32]
    with torch.no_grad():
        z = model.encode(to_model(ds.images[idx])).mean
    assert model.config.scale_factor == pytest.approx(1 / z.std().item(), rel=1e-6)


def test_a_resume_that_changes_the_network_is_refused_and_a_changed_lr_applies(tmp_path, monkeypatch):
    ds = _dataset()
    train_autoencoder(_ae_cfg(tmp_path, max_steps=2), ds, progress=False)
    with pytest.raises(ValueError, match="changed model"):
        train_autoencoder(_ae_cfg(tmp_path, model=replace(AE, latent_channels=3)), ds, progress=False)
    resumed = []
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: resumed.append(self.param_groups[0]["lr"]))
    result = train_autoencoder(_ae_cfg(tmp_path, max_steps=3, lr=1e-3), ds, progress=False)
    assert result.step == 3 and resumed == [1e-3]  # constant schedule after the warm-up: the new peak lr


def test_bad_trainer_configs_are_refused():
    with pytest.raises(ValueError, match="exactly one of max_steps and epochs"):
        AutoencoderTrainConfig()
    with pytest.raises(ValueError, match="allowed: constant, cosine, linear"):
        AutoencoderTrainConfig(max_steps=1, lr_schedule="step")
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        AutoencoderTrainConfig(max_steps=1, batch_size=0)


def test_a_damaged_autoencoder_file_is_named(autoencoder_dir, tmp_path):
    model = load_autoencoder(autoencoder_dir)
    save_autoencoder(model, tmp_path)
    (tmp_path / AUTOENCODER_WEIGHTS).write_bytes((tmp_path / AUTOENCODER_WEIGHTS).read_bytes()[:-8])
    with pytest.raises(CheckpointError, match="does not match"):
        load_autoencoder(tmp_path)


def test_the_feature_loss_needs_its_network():
    from lessons_lib.autoencoder import autoencoder_loss

    model = Autoencoder(replace(AE, feature_weight=1.0))
    with pytest.raises(ValueError, match="needs the feature network"):
        autoencoder_loss(model, torch.zeros(2, 1, 16, 16))
    features = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 4))
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    g = torch.Generator().manual_seed(0)
    loss, parts = autoencoder_loss(model, x, torch.Generator().manual_seed(0), features)
    with torch.no_grad():
        x_hat, posterior = model(x, g)
    expected = (x_hat - x).abs().mean() + AE.kl_weight * posterior.kl().mean() / 256 \
        + (features(x_hat) - features(x)).square().mean()
    torch.testing.assert_close(loss.detach(), expected)
    assert set(parts) == {"reconstruction", "kl", "feature"}


# ----------------------------------------------------------------------------------------------------------
# diffusion on latents
# ----------------------------------------------------------------------------------------------------------
def test_a_latent_model_folder_holds_its_autoencoder_and_one_config(latent_dir, autoencoder_dir):
    pipe = DiffusionPipeline.from_pretrained(latent_dir)
    assert pipe.image_shape == (1, 16, 16) and pipe.sample_shape == (2, 8, 8)
    _same(pipe.autoencoder, load_autoencoder(autoencoder_dir))
    config = json.loads((latent_dir / "config.json").read_text())
    assert config["train"]["autoencoder"] == str(autoencoder_dir) and config["autoencoder"]["config"]["scale_factor"] > 0


def test_the_trainer_refuses_a_network_that_does_not_take_the_latents(tmp_path, autoencoder_dir):
    with pytest.raises(ValueError, match="set the network's in_channels to 2"):
        train(preset("tiny", autoencoder=str(autoencoder_dir), out_dir=str(tmp_path), max_steps=1), _dataset(), progress=False)


def test_a_latent_run_draws_decoded_grids_and_refuses_a_changed_autoencoder_or_another_space(tmp_path, autoencoder_dir):
    from lessons_lib.train import sample_grid

    ae = tmp_path / "ae"
    save_autoencoder(load_autoencoder(autoencoder_dir), ae)
    model = replace(preset("tiny").model, in_channels=2)
    cfg = preset("tiny", model=model, autoencoder=ae, out_dir=tmp_path / "run", max_steps=2, sample_every=2)
    result = train(cfg, _dataset(), progress=False)  # a Path is stored as a string in the JSON config
    assert [p.name for p in result.samples] == ["step_0000002.png"]
    grid = sample_grid(result.ema, cfg, 16, columns=2, steps=2, autoencoder=load_autoencoder(ae))
    assert grid.shape == (20, 1, 16, 16) and grid.abs().max() <= 1
    with pytest.raises(ValueError, match="pass autoencoder= to decode"):
        sample_grid(result.ema, cfg, 16, columns=2, steps=2)
    with pytest.raises(ValueError, match="has changed since this run began"):
        retrained = load_autoencoder(ae)
        with torch.no_grad():
            next(retrained.parameters()).add_(0.01)
        save_autoencoder(retrained, ae)
        train(replace(cfg, max_steps=3), _dataset(), progress=False)
    with pytest.raises(ValueError, match="autoencoder sha256"):  # a latent model's weights cannot start a pixel run
        train(preset("tiny", model=model, init_from=str(tmp_path / "run"), out_dir=str(tmp_path / "pixel"), max_steps=1,
                     num_steps=1000), _dataset(), progress=False)


def test_generate_samples_latents_and_decodes_them(latent_dir):
    pipe = DiffusionPipeline.from_pretrained(latent_dir)
    result = pipe.generate(GenerationConfig(prompt=3, num_images=2, seed=5, sampler="ddim", steps=6), progress=False)
    gens = sample_generators(5, 2)
    sampler = get_sampler("ddim", pipe.schedule, 6, "trailing", clip_x0=False)  # latents have no [-1, 1] range
    z = sample(pipe.model, randn((2, 2, 8, 8), generator=gens), sampler, torch.tensor([3, 3]), 1.0, gens, progress=False,
               clip=False).images
    assert z.abs().max() > 1  # unclipped
    with torch.no_grad():
        expected = pipe.autoencoder.decode(z / pipe.autoencoder.config.scale_factor).clamp(-1, 1)
    assert torch.equal(result.images, expected) and result.images.shape == (2, 1, 16, 16)


def test_latent_edits_are_the_pixel_edits_run_on_encoded_inputs_then_decoded(latent_dir):
    """Image-to-image and inpainting on a latent model equal, bit for bit, the same edit run by hand on the
    encoded image (and the mask taken to the latent grid), decoded; inpainting then pastes the kept pixels back."""
    from lessons_lib.editing import Inpainter, noise_to

    pipe = DiffusionPipeline.from_pretrained(latent_dir)
    ae, image = pipe.autoencoder, to_model(_dataset().images[0])
    kept = pipe.generate(GenerationConfig(init_image=image, strength=0.0, sampler="ddim", steps=6), progress=False)
    assert torch.equal(kept.images[0], image)  # strength 0: the input back, not its reconstruction
    mask = torch.zeros(16, 16)
    mask[4:9, 5:11] = 1
    gens = sample_generators(0, 2)
    eps = randn((2, 2, 8, 8), generator=gens)
    with torch.no_grad():
        z0 = ae.to_latent(image.expand(2, 1, 16, 16))
    cells = downsample_mask(mask.bool().expand(2, 1, 16, 16), 2)
    assert cells.sum() == 2 * 3 * 4  # rows 4-8 and columns 5-10 touch latent rows 2-4 and columns 2-5

    sampler = get_sampler("ddim", pipe.schedule, 6, "trailing", clip_x0=False)
    hook = Inpainter(pipe.model, sampler, z0, cells, gens, None, 1.0, None)
    z = sample(pipe.model, eps, sampler, None, 1.0, gens, progress=False, on_step=hook, clip=False).images
    with torch.no_grad():
        want = torch.where(mask.bool(), ae.from_latent(z).clamp(-1, 1), image)
    got = pipe.generate(GenerationConfig(init_image=image, mask=mask, sampler="ddim", steps=6, num_images=2), progress=False)
    assert torch.equal(got.images, want)

    gens = sample_generators(0, 1)
    eps = randn((1, 2, 8, 8), generator=gens)
    sampler = get_sampler("ddim", pipe.schedule, 6, "trailing", clip_x0=False)
    run = get_sampler("ddim", pipe.schedule, 6, "trailing", clip_x0=False, timesteps=sampler.timesteps[-3:].tolist())
    with torch.no_grad():
        z0 = ae.to_latent(image[None])  # encoded as the pipeline encodes it: a batch of one
    z = sample(pipe.model, noise_to(z0, run.alpha_bars(0)[0], eps), run, None, 1.0, gens, progress=False, clip=False).images
    with torch.no_grad():
        want = ae.from_latent(z).clamp(-1, 1)
    got = pipe.generate(GenerationConfig(init_image=image, strength=0.5, sampler="ddim", steps=6), progress=False)
    assert got.steps == 3 and torch.equal(got.images, want)


def test_the_latent_mask_covers_every_cell_that_holds_a_repainted_pixel():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(3, 2, 12, 12, generator=g) > 0.97
    cells = downsample_mask(mask, 4)
    assert cells.shape == (3, 1, 3, 3)
    for b in range(3):
        for i in range(3):
            for j in range(3):
                assert cells[b, 0, i, j] == mask[b, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4].any()
    with pytest.raises(ValueError, match="divisible by 4"):
        downsample_mask(torch.zeros(1, 1, 10, 10, dtype=torch.bool), 4)


def test_a_saved_latent_pipeline_gives_the_same_images(latent_dir, tmp_path):
    pipe = DiffusionPipeline.from_pretrained(latent_dir)
    copy = DiffusionPipeline.from_pretrained(pipe.save_pretrained(tmp_path))
    c = GenerationConfig(prompt=1, num_images=2, sampler="dpmpp_2m", steps=5)
    assert torch.equal(pipe.generate(c, progress=False).images, copy.generate(c, progress=False).images)


def test_the_bench_times_a_latent_models_network_on_latents_and_scores_decoded_samples(latent_dir, monkeypatch):
    from lessons_lib import bench as B
    from lessons_lib import metrics

    pipe = DiffusionPipeline.from_pretrained(latent_dir)
    scored = []
    monkeypatch.setattr(metrics, "evaluate", lambda images, **kw: scored.append(images) or type("E", (), {"fid": 1.0})())
    rows = B.bench(pipe, formats=(B.EAGER, "torch_export"), precisions=["fp32"], batch_sizes=(3,), repeats=1, steps=2,
                   memory=False, log=None, fid_images=4)
    assert [(r.format, r.batch) for r in rows] == [(B.EAGER, 3), ("torch_export", 3)] and rows[1].max_abs_err < 1e-4
    assert all(images.shape == (4, 1, 16, 16) and images.abs().max() <= 1 for images in scored)  # decoded images


def test_encode_images_gives_the_latents_of_to_latent_in_batches_without_autograd_history():
    """The trainer encodes the whole training set once: every batch must equal to_latent of its images, and no
    autograd graph may be kept (60,000 images' activations would not fit in memory)."""
    torch.manual_seed(0)
    model = Autoencoder(replace(AE, scale_factor=0.5))
    images = _dataset(n=10).images
    z = encode_images(model, images, batch_size=3)
    assert not z.requires_grad and z.grad_fn is None
    with torch.no_grad():
        torch.testing.assert_close(z, model.to_latent(to_model(images)))
