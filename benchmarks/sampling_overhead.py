"""Sampling loop overhead: ``lessons_lib.samplers.sample`` + DDIM against the loop a diffusers user writes.

The diffusers side is the documented hand loop over ``DDIMScheduler`` (``set_timesteps``, then
``model -> scheduler.step`` per timestep), configured to the same process: our cosine schedule's betas,
trailing timesteps, x0 clipped to [-1, 1] with eps re-derived (``use_clipped_model_output``), and the last
step landing on x0 (``set_alpha_to_one``). Both loops drive the same network on the same noise and
labels, and must return the same images (checked before timing). Two networks:

- ``near-zero cost``: eps_hat = 0.1 * x_t, a single multiply, so the time is the loop's own
  (scheduler arithmetic, tensor bookkeeping, Python);
- ``cpu preset U-Net``: the course's default network (random weights, eval mode): end to end.

Each timed block builds the sampler (``get_sampler`` / ``set_timesteps``) and runs the whole loop; blocks
alternate (A B, B A, ...) and the median block gives ms per step; the ratio is ours / diffusers.

Run from the repository root:  python benchmarks/sampling_overhead.py [--steps 50] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import diffusers
import torch
from diffusers import DDIMScheduler
from torch import nn

from lessons_lib import train as T
from lessons_lib.device import randn
from lessons_lib.samplers import get_sampler, sample
from lessons_lib.schedules import NoiseSchedule, get_schedule
from lessons_lib.unet import UNet


class NearZeroCost(nn.Module):
    """eps_hat = 0.1 x_t: a network that costs one multiply, so only the sampling loop is left to time."""

    def forward(self, x, t, class_labels=None):
        return 0.1 * x


def ours(model, x_T, labels, schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    sampler = get_sampler("ddim", schedule, steps, spacing="trailing")
    return sample(model, x_T, sampler, labels, progress=False).images


def diffusers_loop(model, x_T, labels, schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    """What a diffusers user writes around a custom network (as in the diffusers "build your own pipeline" docs)."""
    scheduler = DDIMScheduler(num_train_timesteps=schedule.num_steps, trained_betas=schedule.betas.numpy(),
                              timestep_spacing="trailing", clip_sample=True, set_alpha_to_one=True)
    scheduler.set_timesteps(steps)
    x = x_T
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = model(x, t, labels)
            x = scheduler.step(eps, t, x, use_clipped_model_output=True).prev_sample
    return x.clamp(-1, 1)


LOOPS = {"lessons_lib sample + DDIMSampler": ours, "diffusers DDIMScheduler loop": diffusers_loop}


def time_loops(model, x_T, labels, schedule, steps: int, repeats: int, number: int) -> dict[str, float]:
    """Median ms per sampling step of each loop: ``repeats`` alternating blocks of ``number`` full loops."""
    outputs = {name: loop(model, x_T, labels, schedule, steps) for name, loop in LOOPS.items()}  # also the warm-up
    a, b = outputs.values()
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg="the two loops disagree: not the same sampler")
    times = {name: [] for name in LOOPS}
    for r in range(repeats):
        for name in LOOPS if r % 2 == 0 else reversed(LOOPS):
            start = time.perf_counter()
            for _ in range(number):
                LOOPS[name](model, x_T, labels, schedule, steps)
            times[name].append((time.perf_counter() - start) / (number * steps))
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7, help="timed blocks per loop and network")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cfg = T.preset("cpu")
    schedule = get_schedule(cfg.schedule, cfg.num_steps)
    torch.manual_seed(args.seed)
    networks = {"near-zero cost (0.1 x)": (NearZeroCost().eval(), 20), "cpu preset U-Net": (UNet(cfg.model).eval(), 1)}
    x_T = randn((args.batch_size, 1, 28, 28), seed=args.seed)
    labels = torch.arange(args.batch_size) % cfg.model.num_classes
    print(f"# sampling loop overhead: lessons_lib vs diffusers {diffusers.__version__} DDIMScheduler, the same network")
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, cpu")
    print(f"# DDIM {args.steps} trailing steps, {cfg.schedule} schedule (T={cfg.num_steps}), batch {args.batch_size} of "
          f"1x28x28 with class labels; median of {args.repeats} alternating blocks; both loops give the same images\n",
          flush=True)
    print("| network | lessons_lib ms / step | diffusers ms / step | ratio (ours / diffusers) |")
    print("|---|---:|---:|---:|")
    for name, (model, number) in networks.items():
        ms = time_loops(model, x_T, labels, schedule, args.steps, args.repeats, number)
        mine, theirs = ms.values()
        print(f"| {name} | {mine:.3f} | {theirs:.3f} | {mine / theirs:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
