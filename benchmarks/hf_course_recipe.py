"""Diffusers' recipe from the first unit of the Hugging Face diffusion course, as a time-to-quality candidate.

What the unit trains (its butterflies notebook), kept except for the image's channels:
``UNet2DModel(sample_size=32, layers_per_block=2, block_out_channels=(64, 128, 128, 256), down blocks
Down, Down, AttnDown, AttnDown; up blocks AttnUp, AttnUp, Up, Up)`` with 1 channel instead of 3,
``DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")``, the MSE between the predicted
and the true noise, ``AdamW(lr=4e-4)`` with no warm-up, decay or EMA, batch 64, images normalised to [-1, 1]
and flipped left-right at random, fp32 (the notebook has no autocast). Unconditional: no class labels.

Two things differ from the notebook, both to fit 28x28 Fashion-MNIST: the images are padded by 2 pixels of
background to 32x32 (the unit resizes its butterflies to 32; four levels need a side divisible by 8) and cropped
back to 28x28 before scoring; batches come from the in-memory uint8 tensor with the course trainer's seeded
``batch_indices`` instead of a DataLoader. The squaredcos_cap_v2 betas are the course's ``cosine`` schedule (the
same formula, checked below), so the course's DDIM and DPM-Solver++ sample it with ``prediction="eps"``.

Used by ``time_to_quality.py run hf_course --minutes M``, which scores ``samples`` like the other candidates and
writes the same result.json (FID of unconditional samples against the test images; no class agreement).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from safetensors.torch import load_file, save_file

from lessons_lib import train as T
from lessons_lib.checkpoint import atomic_write
from lessons_lib.data import load_fashion_mnist, to_model
from lessons_lib.samplers import get_sampler, sample
from lessons_lib.schedules import get_schedule

PAD = 2  # 28 + 2 * 2 = 32, the unit's image size
RECIPE = {"batch_size": 64, "lr": 4e-4, "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
          "block_out_channels": (64, 128, 128, 256), "layers_per_block": 2, "image_size": 32, "flip": True}


def build_model() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=RECIPE["image_size"], in_channels=1, out_channels=1,
                       layers_per_block=RECIPE["layers_per_block"], block_out_channels=RECIPE["block_out_channels"],
                       down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))


def scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=RECIPE["num_train_timesteps"], beta_schedule=RECIPE["beta_schedule"])


def course_schedule():
    """The course's cosine schedule, which is diffusers' squaredcos_cap_v2 (checked to float precision)."""
    ours = get_schedule("cosine", RECIPE["num_train_timesteps"])
    theirs = scheduler().alphas_cumprod.double()
    if not torch.allclose(ours.alpha_bar.double(), theirs, rtol=1e-5, atol=1e-7):
        raise RuntimeError("the course's cosine schedule no longer matches diffusers' squaredcos_cap_v2")
    return ours


def batch(images: torch.Tensor, step: int, seed: int = 0) -> torch.Tensor:
    """The step's images in [-1, 1], padded to 32x32 with background, half of them flipped left-right."""
    idx = T.batch_indices(len(images), RECIPE["batch_size"], seed, step)
    x = F.pad(to_model(images[idx]), (PAD,) * 4, value=-1.0)
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    flip = torch.rand(len(x), generator=g) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def train(out: Path, minutes: float, every: int, progress: bool = True) -> dict:
    """Train for ``minutes`` of wall-clock (resumable: ``state.pt`` at every snapshot), keeping the weights every
    ``every`` steps in ``snapshots/step_N.safetensors``; returns the ledger (steps, training seconds)."""
    model, noise = build_model().train(), scheduler()
    opt = torch.optim.AdamW(model.parameters(), lr=RECIPE["lr"])
    images = load_fashion_mnist("train").images
    (out / "snapshots").mkdir(parents=True, exist_ok=True)
    state_path, ledger = out / "state.pt", {"step": 0, "train_s": 0.0}

    def save_state():
        atomic_write(state_path, lambda tmp: torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                                                         "ledger": ledger}, tmp))

    if state_path.exists():
        state = torch.load(state_path, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        ledger = state["ledger"]
    start, base = time.perf_counter(), ledger["train_s"]
    while base + time.perf_counter() - start < 60 * minutes:
        x0 = batch(images, ledger["step"])
        g = torch.Generator().manual_seed(ledger["step"])
        eps = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, noise.config.num_train_timesteps, (len(x0),), generator=g)
        loss = F.mse_loss(model(noise.add_noise(x0, eps, t), t).sample, eps)  # the unit's loss: noise prediction MSE
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ledger["step"] += 1
        ledger["train_s"] = base + time.perf_counter() - start
        if ledger["step"] % every == 0:
            save_file(model.state_dict(), out / "snapshots" / f"step_{ledger['step']:06d}.safetensors")
            save_state()
        if progress and ledger["step"] % 25 == 0:
            print(f"hf_course: step {ledger['step']}, {ledger['train_s'] / 60:.1f} min, loss {loss.item():.4f}", flush=True)
    save_file(model.state_dict(), out / "model.safetensors")
    save_state()
    return ledger


@torch.no_grad()
def samples(weights: Path, n: int, sampler: str, steps: int, seed: int = 0, batch_size: int = 250) -> torch.Tensor:
    """``n`` unconditional samples (1, 28, 28) in [-1, 1] from the weights in ``weights``, cropped from 32x32."""
    model = build_model()
    model.load_state_dict(load_file(weights))
    model.eval()
    schedule = course_schedule()
    eps_model = lambda x, t, y=None: model(x, t).sample  # noqa: E731  (unconditional: the labels are ignored)
    out = []
    for start in range(0, n, batch_size):
        m = min(batch_size, n - start)
        g = torch.Generator().manual_seed(seed + start)
        x_T = torch.randn(m, 1, 32, 32, generator=g)
        s = get_sampler(sampler, schedule, steps, prediction="eps")
        out.append(sample(eps_model, x_T, s, generator=g, progress=False).images[..., PAD:-PAD, PAD:-PAD])
    return torch.cat(out)


def config() -> dict:
    """What result.json records as the run's config (the table reads its schedule to count evaluations)."""
    return {**RECIPE, "schedule": "cosine", "num_steps": RECIPE["num_train_timesteps"], "prediction": "eps",
            "conditional": False, "amp": "off", "model": json.loads(json.dumps(dict(build_model().config)))}
