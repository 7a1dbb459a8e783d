"""Training throughput: the course's U-Net against diffusers' ``UNet2DModel`` of about the same size.

The diffusers twin is built from the same ``UNetConfig``: the same widths per level, residual blocks per
level, attention at the same levels and in the middle, 4 heads, GroupNorm groups of >= 4 channels, dropout,
and a class embedding with the null class (``num_class_embeds = num_classes + 1``). 28x28 images need no
padding: three levels mean two downsamplings (28 -> 14 -> 7) in both networks.

A timed step is what the trainer does per batch, minus the EMA: forward, the diffusion loss
(``lessons_lib.train.diffusion_loss``), backward, gradient clipping and an AdamW step, with mixed precision
on CUDA. Both networks see the same batches (Fashion-MNIST images, t, eps and dropped labels from the
trainer's seeded ``batch_indices`` / ``step_noise``). After warm-up, blocks of steps are timed alternately
(A B, B A, ...) and the median block gives images/s; the ratio is ours / diffusers.

Peak memory is measured in a fresh process per network: CUDA ``max_memory_allocated``, or on CPU the
growth of the peak resident set (Linux ``VmHWM``; not ``ru_maxrss``, which a child inherits from its parent)
over the process's size just before the network was built: weights, gradients, AdamW state, activations
and whatever the allocator keeps.

Run from the repository root:  python benchmarks/train_throughput.py [--preset cpu|gpu] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import diffusers
import torch
from diffusers import UNet2DModel
from torch import nn

from lessons_lib import train as T
from lessons_lib.data import load_fashion_mnist, to_model
from lessons_lib.device import autocast, get_device
from lessons_lib.schedules import get_schedule
from lessons_lib.unet import UNet, UNetConfig, _norm, count_parameters

MODELS = ("ours", "diffusers")


class DiffusersTwin(nn.Module):
    """``UNet2DModel`` shaped like our ``UNetConfig``, called as ``model(x, t, class_labels)`` like ours."""

    def __init__(self, m: UNetConfig, image_size: int = 28):
        super().__init__()
        widths = [m.base_channels * k for k in m.channel_mults]
        self.net = UNet2DModel(
            sample_size=image_size, in_channels=m.in_channels, out_channels=m.in_channels, block_out_channels=widths,
            layers_per_block=m.num_res_blocks,
            down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in m.attention_levels],
            up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(m.attention_levels)],
            attention_head_dim=widths[-1] // m.num_heads,
            norm_num_groups=_norm(widths[0]).num_groups,  # our rule (groups of >= 4 channels) at the narrowest level
            dropout=m.dropout, num_class_embeds=m.num_classes + 1 if m.num_classes else None)

    def forward(self, x, t, class_labels=None):
        return self.net(x, t, class_labels=class_labels).sample


def build(name: str, cfg: T.TrainConfig, device: torch.device) -> nn.Module:
    torch.manual_seed(cfg.seed)
    model = UNet(cfg.model) if name == "ours" else DiffusersTwin(cfg.model)
    return model.to(device).train()


def make_batches(cfg: T.TrainConfig, count: int, device: torch.device, synthetic: bool = False) -> list[tuple]:
    """The trainer's first ``count`` batches (x0, t, eps, labels with class dropout); ``synthetic``: random pixels."""
    if synthetic:
        g = torch.Generator().manual_seed(cfg.seed)
        images = torch.randint(0, 256, (cfg.batch_size, 1, 28, 28), generator=g, dtype=torch.uint8)
        labels = torch.zeros(cfg.batch_size, dtype=torch.long)
    else:
        ds = load_fashion_mnist("train")
        images, labels = ds.images, ds.labels
    batches = []
    for step in range(count):
        idx = T.batch_indices(len(images), cfg.batch_size, cfg.seed, step)
        t, eps, drop = T.step_noise(cfg, step, (cfg.batch_size, *images.shape[1:]))
        y = torch.where(drop, cfg.model.num_classes, labels[idx])
        batches.append(tuple(v.to(device) for v in (to_model(images[idx]), t, eps, y)))
    return batches


def make_step(model: nn.Module, cfg: T.TrainConfig, device: torch.device):
    """One training step on a batch, as in ``lessons_lib.train.train`` without the EMA update."""
    schedule = get_schedule(cfg.schedule, cfg.num_steps, zero_terminal_snr=cfg.zero_terminal_snr)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def step(batch):
        x0, t, eps, y = batch
        with autocast(device):
            loss = T.diffusion_loss(model, x0, t, eps, y, schedule, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resident_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process in MiB, from /proc (Linux); NaN elsewhere."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 2**10  # in kB
    except OSError:
        return float("nan")


def peak_memory_mib(name: str, cfg: T.TrainConfig, device: torch.device, steps: int = 5) -> float:
    """In this (fresh) process: peak memory of ``steps`` training steps of one network, in MiB."""
    batches = make_batches(cfg, 1, device, synthetic=True)  # the pixels do not change the memory
    before = resident_mib("VmRSS")
    step = make_step(build(name, cfg, device), cfg, device)
    for _ in range(steps):
        step(batches[0])
    synchronize(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resident_mib("VmHWM") - before


def measure_memory(name: str, args) -> float:
    cmd = [sys.executable, __file__, "--memory-of", name, "--preset", args.preset]
    cmd += ["--device", args.device] if args.device else []
    cmd += ["--batch-size", str(args.batch_size)] if args.batch_size else []
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu", choices=["cpu", "gpu"], help="the trainer preset whose U-Net and batch to use")
    parser.add_argument("--device", default=None, help="cpu (default on a machine without a GPU), cuda, ...")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per network first")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks per network")
    parser.add_argument("--memory-of", choices=MODELS, help=argparse.SUPPRESS)  # internal: one network, one process
    args = parser.parse_args()
    device = get_device(args.device)
    cfg = T.preset(args.preset, **({"batch_size": args.batch_size} if args.batch_size else {}))
    if args.memory_of:
        print(json.dumps({"peak_mib": peak_memory_mib(args.memory_of, cfg, device)}))
        return

    models = {name: build(name, cfg, device) for name in MODELS}
    params = {name: count_parameters(m) for name, m in models.items()}
    steps = {name: make_step(m, cfg, device) for name, m in models.items()}
    batches = make_batches(cfg, args.warmup + args.steps * args.repeats, device)
    print(f"# training throughput: the {args.preset} preset's U-Net vs diffusers {diffusers.__version__} UNet2DModel")
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}")
    print(f"# batch {cfg.batch_size} of 1x28x28 (no padding: 28 -> 14 -> 7 in both), widths "
          f"{[cfg.model.base_channels * k for k in cfg.model.channel_mults]}, {cfg.model.num_res_blocks} res block(s) per level, "
          f"attention at levels {cfg.model.attention_levels} + middle, {cfg.model.num_classes} classes + null")
    print(f"# parameters: ours {params['ours']:,}, diffusers {params['diffusers']:,} "
          f"({params['diffusers'] / params['ours'] - 1:+.1%})")
    print(f"# step = forward + loss + backward + clip + AdamW{', bf16/fp16 autocast' if device.type == 'cuda' else ', fp32'}; "
          f"{args.warmup} warm-up steps, then {args.repeats} blocks of {args.steps} steps each, alternating A B / B A\n",
          flush=True)

    for name in MODELS:
        for batch in batches[:args.warmup]:
            steps[name](batch)
    times = {name: [] for name in MODELS}
    for r in range(args.repeats):
        block = batches[args.warmup + r * args.steps:args.warmup + (r + 1) * args.steps]
        for name in MODELS if r % 2 == 0 else reversed(MODELS):
            synchronize(device)
            start = time.perf_counter()
            for batch in block:
                steps[name](batch)
            synchronize(device)
            times[name].append((time.perf_counter() - start) / args.steps)
    memory = {name: measure_memory(name, args) for name in MODELS}

    kind = "CUDA max allocated" if device.type == "cuda" else "peak RSS growth"
    print(f"| model | parameters | ms / step (median) | min - max | images / s | {kind} (MiB) |")
    print("|---|---:|---:|---:|---:|---:|")
    rate = {}
    for name in MODELS:
        med = statistics.median(times[name])
        rate[name] = cfg.batch_size / med
        label = "lessons_lib UNet" if name == "ours" else "diffusers UNet2DModel"
        print(f"| {label} | {params[name] / 1e6:.2f}M | {1e3 * med:.0f} | {1e3 * min(times[name]):.0f} - "
              f"{1e3 * max(times[name]):.0f} | {rate[name]:.1f} | {memory[name]:.0f} |")
    print(f"\nthroughput ratio ours / diffusers: {rate['ours'] / rate['diffusers']:.2f}x; "
          f"memory ratio: {memory['ours'] / memory['diffusers']:.2f}x")


if __name__ == "__main__":
    main()
