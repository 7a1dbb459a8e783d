"""Sampling overhead: our sampling loop and pipeline against diffusers', driving the same network.

Two pairs, each on the same network, noise and settings, and each checked to return the same images first:

- the loops: ``lessons_lib.samplers.sample`` + DDIM against the documented hand loop over diffusers'
  ``DDIMScheduler`` (``set_timesteps``, then ``model -> scheduler.step`` per timestep);
- the pipelines: ``DiffusionPipeline.generate`` (``sampler="ddim"``) against diffusers' ``DDIMPipeline``, our
  network behind the ``unet(x, t).sample`` interface it calls, each built once. Both draw per-image seeded
  noise, run the loop and return a tensor, so the time includes what a user pays per call.

The scheduler is configured to our process: our schedule's betas, trailing timesteps, x0 clipped to [-1, 1]
with eps re-derived (``use_clipped_model_output``), the last step landing on x0 (``set_alpha_to_one``);
no guidance (diffusers' DDIMPipeline has none), so every network call is one batch. Two networks:

- ``near-zero cost``: eps_hat = 0.1 * x_t, a single multiply, so the time is the loop's own
  (scheduler arithmetic, tensor bookkeeping, Python);
- the shipped model (``data/pretrained/ddpm_fmnist``; a cpu-preset U-Net with random weights without it):
  end to end.

Each timed block runs the whole call; blocks alternate (A B, B A, ...) and the median block gives ms per
step; the ratio is ours / diffusers.

Run from the repository root:  python benchmarks/sampling_overhead.py [--steps 50] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from types import SimpleNamespace

import diffusers
import torch
from diffusers import DDIMPipeline, DDIMScheduler
from torch import nn

from lessons_lib import train as T
from lessons_lib.config import PRETRAINED_MODEL
from lessons_lib.device import randn, sample_generators
from lessons_lib.pipeline import DiffusionPipeline
from lessons_lib.samplers import get_sampler, sample
from lessons_lib.unet import UNet, UNetConfig


class NearZeroCost(nn.Module):
    """eps_hat = 0.1 x_t: a network that costs one multiply, so only the sampling loop is left to time."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config  # the shapes the pipelines read
        self.scale = nn.Parameter(torch.tensor(0.1))

    def forward(self, x, t, class_labels=None):
        return self.scale * x


class AsDiffusersUNet(nn.Module):
    """Our network behind what diffusers' pipelines call: ``unet(x, t).sample``, ``config``, ``dtype``, ``device``."""

    def __init__(self, model: nn.Module, image_size: int):
        super().__init__()
        self.model = model
        self.config = SimpleNamespace(sample_size=image_size, in_channels=model.config.in_channels)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, x, t):
        return SimpleNamespace(sample=self.model(x, t))  # no labels: the null class, like our unconditional pipeline


def scheduler_for(pipe: DiffusionPipeline) -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=pipe.schedule.num_steps, trained_betas=pipe.schedule.betas.numpy(),
                         timestep_spacing="trailing", clip_sample=True, set_alpha_to_one=True)


def our_loop(pipe: DiffusionPipeline, n: int, steps: int, seed: int) -> torch.Tensor:
    x_T = randn((n, *pipe.image_shape), seed=seed)
    return sample(pipe.model, x_T, get_sampler("ddim", pipe.schedule, steps, spacing="trailing"), progress=False).images


def diffusers_loop(pipe: DiffusionPipeline, n: int, steps: int, seed: int) -> torch.Tensor:
    """What a diffusers user writes around a custom network (as in the diffusers "build your own pipeline" docs)."""
    scheduler = scheduler_for(pipe)
    scheduler.set_timesteps(steps)
    x = randn((n, *pipe.image_shape), seed=seed)
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = pipe.model(x, t)
            x = scheduler.step(eps, t, x, use_clipped_model_output=True).prev_sample
    return x.clamp(-1, 1)


def our_pipeline(pipe: DiffusionPipeline, n: int, steps: int, seed: int) -> torch.Tensor:
    return pipe.generate(num_images=n, seed=seed, sampler="ddim", steps=steps, progress=False).images


_DDIM_PIPELINES: dict[int, DDIMPipeline] = {}  # built once per network, like our DiffusionPipeline


def diffusers_pipeline(pipe: DiffusionPipeline, n: int, steps: int, seed: int) -> torch.Tensor:
    if id(pipe) not in _DDIM_PIPELINES:
        built = DDIMPipeline(unet=AsDiffusersUNet(pipe.model, pipe.image_shape[-1]), scheduler=scheduler_for(pipe))
        built.set_progress_bar_config(disable=True)
        _DDIM_PIPELINES[id(pipe)] = built
    theirs = _DDIM_PIPELINES[id(pipe)]
    with torch.no_grad():
        images = theirs(batch_size=n, generator=sample_generators(seed, n), num_inference_steps=steps,
                        use_clipped_model_output=True, output_type="pt").images  # in [0, 1]
    return images * 2 - 1


PAIRS = {  # what is compared: ours, then the diffusers counterpart
    "loop": {"lessons_lib sample + DDIMSampler": our_loop, "diffusers DDIMScheduler loop": diffusers_loop},
    "pipeline": {"lessons_lib DiffusionPipeline": our_pipeline, "diffusers DDIMPipeline": diffusers_pipeline},
}


def time_pair(loops: dict, pipe, n: int, steps: int, seed: int, repeats: int, number: int) -> dict[str, float]:
    """Median ms per sampling step of each of the two calls: ``repeats`` alternating blocks of ``number`` calls."""
    a, b = (loop(pipe, n, steps, seed) for loop in loops.values())  # also the warm-up
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"{' and '.join(loops)} disagree: not the same sampler")
    times = {name: [] for name in loops}
    for r in range(repeats):
        for name in loops if r % 2 == 0 else reversed(loops):
            start = time.perf_counter()
            for _ in range(number):
                loops[name](pipe, n, steps, seed)
            times[name].append((time.perf_counter() - start) / (number * steps))
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7, help="timed blocks per call and network")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if PRETRAINED_MODEL.exists():
        shipped = DiffusionPipeline.from_pretrained(PRETRAINED_MODEL, device="cpu")
        name = f"shipped U-Net ({sum(p.numel() for p in shipped.model.parameters()) / 1e6:.2f}M)"
    else:
        cfg = T.preset("cpu")
        torch.manual_seed(args.seed)
        shipped = DiffusionPipeline(UNet(cfg.model), T.get_schedule(cfg.schedule, cfg.num_steps))
        name = "cpu preset U-Net (random weights)"
    shipped.model.eval()
    cheap = DiffusionPipeline(NearZeroCost(shipped.model.config).eval(), shipped.schedule)
    print(f"# sampling overhead: lessons_lib vs diffusers {diffusers.__version__}, the same network, noise and settings")
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, cpu")
    print(f"# DDIM {args.steps} trailing steps, T={shipped.schedule.num_steps}, batch {args.batch_size} of "
          f"{'x'.join(map(str, shipped.image_shape))}, unconditional (null class); median of {args.repeats} alternating "
          "blocks; each pair gives the same images\n", flush=True)
    print("| network | compared | lessons_lib ms / step | diffusers ms / step | ratio (ours / diffusers) |")
    print("|---|---|---:|---:|---:|")
    for net_name, pipe, number in (("near-zero cost (0.1 x)", cheap, 20), (name, shipped, 1)):
        for what, loops in PAIRS.items():
            mine, theirs = time_pair(loops, pipe, args.batch_size, args.steps, args.seed, args.repeats, number).values()
            print(f"| {net_name} | {what} | {mine:.3f} | {theirs:.3f} | {mine / theirs:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
