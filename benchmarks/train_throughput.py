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
from lessons_lib.device import get_device
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


VARIANTS = {  # name: (network, autocast dtype, channels_last, torch.compile)
    "diffusers fp32": ("diffusers", None, False, False),  # how diffusers' training example runs on a CPU
    "diffusers bf16": ("diffusers", torch.bfloat16, False, False),
    "ours fp32": ("ours", None, False, False),
    "ours bf16": ("ours", torch.bfloat16, False, False),
    "ours bf16 channels_last": ("ours", torch.bfloat16, True, False),
    "ours bf16 compile": ("ours", torch.bfloat16, False, True),
}
CUDA_VARIANTS = {k: VARIANTS[k] for k in ("diffusers fp32", "diffusers bf16", "ours bf16", "ours bf16 compile")}


def make_step(model: nn.Module, cfg: T.TrainConfig, device: torch.device, dtype: torch.dtype | None = None,
              channels_last: bool = False, compile: bool = False):
    """One training step on a batch, as in ``lessons_lib.train.train`` without the EMA update."""
    schedule = get_schedule(cfg.schedule, cfg.num_steps, zero_terminal_snr=cfg.zero_terminal_snr)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if compile else model

    def step(batch):
        x0, t, eps, y = batch
        if channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = T.diffusion_loss(net, x0, t, eps, y, schedule, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()

    return step


def step_flops(name: str, cfg: T.TrainConfig, device: torch.device) -> int:
    """FLOPs of one forward + backward of ``name`` on a batch, counted by ``torch.utils.flop_counter``
    (matrix products and convolutions: the elementwise work is not counted, as in every FLOP/s figure)."""
    from torch.utils.flop_counter import FlopCounterMode

    model, batch = build(name, cfg, device), make_batches(cfg, 1, device, synthetic=True)[0]
    schedule = get_schedule(cfg.schedule, cfg.num_steps)
    with FlopCounterMode(display=False) as counter:
        T.diffusion_loss(model, *batch[:3], batch[3], schedule, cfg).backward()
    return counter.get_total_flops()


def cpu_peak_flops(cores: int) -> tuple[dict[str, float], str]:
    """Peak FLOP/s of ``cores`` cores of this CPU, per dtype, and how it was derived.

    Per core and cycle: fp32 with two FMA units x lanes x 2, i.e. 64 on a 512-bit datapath (16 lanes) and 32 on a
    256-bit one: AVX2, and AMD Zen 4 (family 25), which runs each AVX-512 instruction as two 256-bit halves.
    bf16 on AMX: one 16x32 by 32x16 tile product (16,384 FLOPs) per 16 cycles = 1,024; on AVX512-BF16 alone, a dot
    product of bf16 pairs per fp32 lane on both FMA units: twice the fp32 figure; without either, bf16 is emulated
    in fp32 (the fp32 figure). The clock is the kernel's ``cpu MHz`` (a virtual machine reports its nominal clock;
    turbo can be higher)."""
    info = open("/proc/cpuinfo").read().splitlines()
    field = lambda key: next((line.split(":", 1)[1].strip() for line in info if line.startswith(key)), "")  # noqa: E731
    mhz = max(float(line.split(":")[1]) for line in info if line.startswith("cpu MHz"))
    zen4 = field("vendor_id") == "AuthenticAMD" and field("cpu family") == "25"
    if torch.cpu._is_avx512_supported():
        fp32_isa, fp32_per_cycle = ("AVX-512 on 256-bit units (Zen 4)", 32) if zen4 else ("AVX-512", 64)
    else:
        fp32_isa, fp32_per_cycle = "AVX2", 32
    bf16_isa, bf16_per_cycle = (("AMX", 1024) if torch.cpu._is_amx_tile_supported() else
                                ("AVX512-BF16", 2 * fp32_per_cycle) if torch.cpu._is_avx512_bf16_supported() else
                                ("none: emulated in fp32", fp32_per_cycle))
    hz = mhz * 1e6
    how = (f"{cores} cores x {mhz / 1e3:.2f} GHz x (fp32 {fp32_isa}: {fp32_per_cycle}, bf16 {bf16_isa}: "
           f"{bf16_per_cycle} FLOP/cycle)")
    return {"fp32": cores * hz * fp32_per_cycle, "bf16": cores * hz * bf16_per_cycle}, how


def onednn_kernels(preset: str) -> str:
    """Which oneDNN kernels one bf16 training step runs (``ONEDNN_VERBOSE=1`` in a fresh process): counts of
    convolution and matmul primitives by implementation, e.g. ``brg_conv_fwd:avx10_1_512_amx``."""
    code = ("import torch, sys; sys.argv = ['x']; from lessons_lib import train as T; "
            "from lessons_lib.unet import UNet; from lessons_lib.schedules import get_schedule; "
            f"cfg = T.preset('{preset}', batch_size=16); m = UNet(cfg.model); s = get_schedule('cosine', 1000); "
            "x = torch.rand(16, 1, 28, 28) * 2 - 1; t = torch.randint(0, 1000, (16,)); y = torch.randint(0, 11, (16,));\n"
            "with torch.autocast('cpu', dtype=torch.bfloat16): loss = T.diffusion_loss(m, x, t, torch.randn_like(x), y, s, cfg)\n"
            "loss.backward()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "ONEDNN_VERBOSE": "1"}).stdout
    counts: dict[str, int] = {}
    for line in out.splitlines():
        f = line.split(",")
        if len(f) > 6 and f[3] == "exec" and f[5] in ("convolution", "matmul"):
            counts[f[6]] = counts.get(f[6], 0) + 1
    return ", ".join(f"{n} x {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "no oneDNN primitives"


def trainer_seconds_per_step(preset: str, batch_size: int, procs: int, steps: tuple[int, int] = (10, 40)) -> float:
    """Seconds per step of the real trainer (``python -m lessons_lib train``): the difference of two runs of
    ``steps`` steps, so start-up is not counted. ``procs`` > 1 runs ``torchrun`` with one thread per process."""
    import tempfile

    times = []
    for n in steps:
        with tempfile.TemporaryDirectory() as out:
            args = ["-m", "lessons_lib", "train", "--preset", preset, "--batch-size", str(batch_size), "--max-steps", str(n),
                    "--checkpoint-every", "100000", "--no-progress", "--device", "cpu", "--amp", "bf16", "--out-dir", out]
            if procs > 1:
                args = ["-m", "torch.distributed.run", f"--nproc_per_node={procs}", "--master_port=29533", *args]
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) // procs))}
            start = time.perf_counter()
            subprocess.run([sys.executable, *args], check=True, capture_output=True, env=env)
            times.append(time.perf_counter() - start)
    return (times[1] - times[0]) / (steps[1] - steps[0])


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


def time_variants(variants: dict, cfg: T.TrainConfig, device: torch.device, batches: list, warmup: int, steps: int,
                  repeats: int) -> dict[str, list[float]]:
    """Seconds per step of each variant: after ``warmup`` steps each, ``repeats`` blocks of ``steps`` steps taken
    in turns, the order reversed every other block (A B C, C B A, ...), on the same batches."""
    runs = {name: make_step(build(net, cfg, device), cfg, device, dtype, cl, comp)
            for name, (net, dtype, cl, comp) in variants.items()}
    for step in runs.values():
        for batch in batches[:warmup]:
            step(batch)
    times = {name: [] for name in runs}
    for r in range(repeats):
        block = batches[warmup + r * steps:warmup + (r + 1) * steps]
        for name in list(runs) if r % 2 == 0 else list(reversed(runs)):
            synchronize(device)
            start = time.perf_counter()
            for batch in block:
                runs[name](batch)
            synchronize(device)
            times[name].append((time.perf_counter() - start) / steps)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu", choices=["cpu", "long", "gpu"], help="the trainer preset whose U-Net to use")
    parser.add_argument("--device", default=None, help="cpu (default on a machine without a GPU), cuda, ...")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[32, 64, 128, 256],
                        help="images/s of 'ours bf16' at each batch size (the table that chose the preset's)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks per variant")
    parser.add_argument("--no-trainer", action="store_true", help="skip timing the real trainer in 1 and 2 processes")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory column")
    parser.add_argument("--memory-of", choices=MODELS, help=argparse.SUPPRESS)  # internal: one network, one process
    args = parser.parse_args()
    device = get_device(args.device)
    cfg = T.preset(args.preset, **({"batch_size": args.batch_size} if args.batch_size else {}))
    if args.memory_of:
        print(json.dumps({"peak_mib": peak_memory_mib(args.memory_of, cfg, device)}))
        return
    variants = VARIANTS if device.type == "cpu" else CUDA_VARIANTS
    cores = len(os.sched_getaffinity(0))
    print(f"# training throughput: the {args.preset} preset's U-Net, variants of one step, vs diffusers {diffusers.__version__}")
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"# {platform.machine()}, {cores} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}"
          f"{gpu}; batch {cfg.batch_size} of 1x28x28")
    params = {name: count_parameters(build(name, cfg, device)) for name in MODELS}
    flops = {name: step_flops(name, cfg, device) for name in MODELS}
    print(f"# parameters: ours {params['ours']:,}, diffusers {params['diffusers']:,}; FLOPs per step (forward + backward): "
          f"ours {flops['ours'] / 1e9:.1f} G, diffusers {flops['diffusers'] / 1e9:.1f} G")
    peak, how = cpu_peak_flops(cores) if device.type == "cpu" else ({}, "")
    if how:
        print(f"# peak: {how} = fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s")
        print(f"# oneDNN kernels of one bf16 step: {onednn_kernels(args.preset)}")
    print(f"# step = forward + loss + backward + clip + AdamW; {args.warmup} warm-up steps, then {args.repeats} blocks of "
          f"{args.steps} steps per variant, in turns\n", flush=True)

    batches = make_batches(cfg, args.warmup + args.steps * args.repeats, device)
    times = time_variants(variants, cfg, device, batches, args.warmup, args.steps, args.repeats)
    memory = {name: measure_memory(name, args) for name in MODELS} if not args.no_memory else {}
    base = cfg.batch_size / statistics.median(times["diffusers fp32"])
    print("| variant | ms / step | images / s | vs diffusers fp32 | GFLOP/s | share of peak | peak RSS growth (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (net, dtype, _, _) in variants.items():
        med = statistics.median(times[name])
        achieved = flops[net] / med
        share = f"{achieved / peak['bf16' if dtype else 'fp32']:.1%}" if peak else "-"
        mem = f"{memory[net]:.0f}" if memory and name.endswith("fp32") else "-"
        print(f"| {name} | {1e3 * med:.0f} | {cfg.batch_size / med:.0f} | {cfg.batch_size / med / base:.2f}x | "
              f"{achieved / 1e9:.0f} | {share} | {mem} |")

    if device.type == "cpu" and not args.no_trainer:
        one = trainer_seconds_per_step(args.preset, cfg.batch_size, 1)
        two = trainer_seconds_per_step(args.preset, cfg.batch_size, 2)
        rate = {k: cfg.batch_size / v for k, v in (("one", one), ("two", two))}
        print(f"\nthe trainer itself (bf16, batch {cfg.batch_size}, {cores} cores): one process with {cores} threads "
              f"{rate['one']:.0f} images/s ({rate['one'] / base:.2f}x diffusers fp32); torchrun with 2 processes x "
              f"{max(1, cores // 2)} thread(s) {rate['two']:.0f} images/s ({rate['two'] / base:.2f}x)")

    if args.batch_sizes:
        print("\n| ours bf16: batch | ms / step | images / s |\n|---:|---:|---:|")
        for bs in args.batch_sizes:
            c = T.preset(args.preset, batch_size=bs)
            t = time_variants({"ours bf16": variants["ours bf16"]}, c, device, make_batches(c, 2 + 2 * 3, device), 2, 2, 3)
            med = statistics.median(t["ours bf16"])
            print(f"| {bs} | {1e3 * med:.0f} | {bs / med:.0f} |", flush=True)


if __name__ == "__main__":
    main()
