"""Learning: the denoising objective and a training loop that runs on a laptop or under torchrun.

One step (DDPM Algorithm 1): take clean images x0, pick t uniformly, draw eps, form x_t with
``q_sample``, and regress the network's output onto the target of the chosen parametrisation
(eps, v or x0), optionally weighted per t with min-SNR-gamma (Hang et al. 2023).

Reproducibility by construction: everything random at step ``s`` (which images, t, eps, which labels
are dropped, dropout) is drawn from generators seeded with ``(seed, s)``. So resuming needs only the
step counter next to the model, EMA, optimizer and LR-scheduler states, and N steps + resume + M steps
gives the same weights as N + M steps in one go (tested on CPU).

To watch a run: ``loss.csv`` beside each checkpoint (:func:`plot_loss` draws it), and with ``sample_every``
a grid of EMA samples every that many steps in ``samples/``, drawn from fixed seeds of its own, so the
weights come out bit-identical with or without it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from .autoencoder import Autoencoder, encode_images, load_autoencoder
from .checkpoint import (
    AUTOENCODER,
    CheckpointError,
    atomic_write,
    load_state,
    pipeline_record,
    read_config,
    save_pretrained,
    writable_folder,
)
from .config import BUILD_DIR
from .data import ImageDataset, load_fashion_mnist, to_model
from .device import get_device, randn, training_autocast_dtype
from .noising import PREDICTION_TYPES, q_sample, v_from_x0_eps
from .pipeline import DiffusionPipeline
from .samplers import get_sampler, sample
from .schedules import NAMED_SCHEDULES, NoiseSchedule, get_schedule, schedule_record
from .unet import UNet, UNetConfig, count_parameters

LOSSES = ("l2", "l1", "huber")
AMP_MODES = ("auto", "bf16", "fp16", "off")
WEIGHTINGS = ("uniform", "min_snr")
LR_SCHEDULES = ("constant", "cosine", "linear")
TIMESTEP_DRAWS = ("uniform", "logsnr_normal")
RESUME = "resume.pt"
LOSS_CSV = "loss.csv"
SAMPLES_DIR = "samples"
SNAPSHOTS_DIR = "snapshots"


PLAN_MIN_WARMUP = 10
PLAN_TIMED_SHARE = 0.1  # a planned run times its steps for this share of its budget past the warm-up (plan_steps)


def _check_number(name: str, value, low: float | None, allow_none: bool = False) -> None:
    """``value`` is a finite number above ``low`` (exclusive; None: any), or a clear ValueError."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and value <= low:
        raise ValueError(f"{name} must be > {low}, got {value}")


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint on disk is untouched."""


@dataclass
class TrainConfig:
    """Everything a training run needs; saved with every checkpoint."""

    model: UNetConfig = field(default_factory=lambda: UNetConfig(num_classes=10))
    schedule: str = "cosine"
    num_steps: int = 1000  # T, diffusion steps
    zero_terminal_snr: bool = False
    prediction: str = "eps"  # what the network predicts: eps, v or x0
    loss: str = "l2"
    weighting: str = "uniform"  # or min_snr
    min_snr_gamma: float = 5.0
    timesteps: str = "uniform"  # how t is drawn: uniform, or logsnr_normal (log-SNR ~ N(logsnr_mean, logsnr_std))
    logsnr_mean: float = 2.4  # EDM's ln(sigma) ~ N(-1.2, 1.2) (Karras et al. 2022, Table 1) is log-SNR ~ N(2.4, 2.4)
    logsnr_std: float = 2.4
    batch_size: int = 128  # global batch, split evenly across processes
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 200
    lr_schedule: str = "constant"  # after the warm-up: constant, or cosine / linear decay to 0 at the last step
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999
    ema_sigma_rel: float | None = None  # set: power-function EMA of this relative width (Karras et al. 2024)
    class_dropout: float = 0.1  # probability of training a sample as the null class (classifier-free guidance)
    max_steps: int | None = None  # stop at whichever of max_steps / epochs / minutes comes first
    epochs: float | None = None
    minutes: float | None = None  # wall-clock budget of this run (resume to continue); see plan_steps
    seed: int = 0
    device: str | None = None
    amp: str = "auto"  # auto: bf16 (else fp16) on CUDA, bf16 on CPUs with AMX / AVX512-BF16, else fp32
    compile: bool = False
    channels_last: bool = False
    out_dir: str = str(BUILD_DIR / "runs" / "default")
    checkpoint_every: int = 500
    log_every: int = 25
    sample_every: int | None = None  # write a grid of EMA samples every N steps (and at the end)
    snapshot_every: int | None = None  # keep the EMA model folder of every N-th step in snapshots/step_XXXXXXX/
    init_from: str | None = None  # a model folder whose weights a new run starts from (e.g. a model whose run is lost)
    autoencoder: str | None = None  # an autoencoder folder: diffuse its latents (latent diffusion); None: pixels

    def __post_init__(self):
        if isinstance(self.model, dict):
            self.model = UNetConfig(**self.model)
        for name in ("autoencoder", "init_from", "out_dir"):  # paths are stored as strings (the config is JSON)
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))
        if isinstance(self.amp, bool):  # configs saved before amp named a mode said True (auto) or False (off)
            self.amp = "auto" if self.amp else "off"
        for name, value, allowed in (("prediction", self.prediction, PREDICTION_TYPES), ("loss", self.loss, LOSSES),
                                     ("weighting", self.weighting, WEIGHTINGS), ("amp", self.amp, AMP_MODES),
                                     ("lr_schedule", self.lr_schedule, LR_SCHEDULES),
                                     ("timesteps", self.timesteps, TIMESTEP_DRAWS)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")
        if self.weighting == "min_snr" and self.prediction == "flow":
            raise ValueError("min_snr weighting is written for eps, v and x0 targets; train prediction='flow' with "
                             "weighting='uniform' (rectified flow's loss), choosing t with timesteps")
        if self.max_steps is None and self.epochs is None and self.minutes is None:
            raise ValueError("say how long to train: max_steps, epochs or minutes")
        if self.schedule not in NAMED_SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; allowed: {', '.join(NAMED_SCHEDULES)}")
        for name, low in (("lr", 0), ("weight_decay", None), ("min_snr_gamma", 0), ("epochs", 0), ("minutes", 0),
                          ("logsnr_mean", None)):
            _check_number(name, getattr(self, name), low, allow_none=name in ("epochs", "minutes"))
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip is not None:
            _check_number("grad_clip", self.grad_clip, 0)
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1) (e.g. 0.999: about the last 1,000 steps), got {self.ema_decay}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must lie in [0, 2**63), got {self.seed}")
        for name in ("max_steps", "num_steps", "warmup_steps"):
            low = {"max_steps": 1, "num_steps": 2, "warmup_steps": 0}[name]
            if getattr(self, name) is not None and getattr(self, name) < low:
                what = {"max_steps": "a run of 0 steps would save random weights", "num_steps": "T, the diffusion steps",
                        "warmup_steps": "0: no warm-up"}[name]
                raise ValueError(f"{name} must be >= {low} ({what}), got {getattr(self, name)}")
        for name in ("batch_size", "checkpoint_every", "log_every", "sample_every", "snapshot_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.class_dropout < 1:
            raise ValueError(f"class_dropout must lie in [0, 1), got {self.class_dropout}")
        if self.ema_sigma_rel is not None and not 0 < self.ema_sigma_rel < 0.28:
            raise ValueError(f"ema_sigma_rel must lie in (0, 0.28) (0.28 is the widest power EMA, gamma = 0), "
                             f"got {self.ema_sigma_rel}")
        if self.logsnr_std <= 0:
            raise ValueError(f"logsnr_std must be > 0, got {self.logsnr_std}")
        if self.plans_from_clock() and self.warmup_steps < PLAN_MIN_WARMUP:
            raise ValueError(f"a decaying lr_schedule with a minutes budget times its steps from the warm-up on to plan them: "
                             f"warmup_steps must be >= {PLAN_MIN_WARMUP}, got {self.warmup_steps}")

    def plans_from_clock(self) -> bool:
        """True when the step count comes from the measured speed: a decaying schedule and only a minutes budget."""
        return self.lr_schedule != "constant" and self.max_steps is None and self.epochs is None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def preset(name: str, **overrides) -> TrainConfig:
    """``cpu``: lesson 04's 30-minute run on a 2-core laptop (a 1.1M-parameter U-Net, v prediction, min-SNR-5,
    batch 64, lr 2e-3 kept constant after the warm-up, EMA 0.999 with its ramp, bf16 autocast where the CPU has
    AMX or AVX512-BF16: what the time-to-quality study found best at that length; at equal minutes batches of 64
    beat 128, keeping most of its images/s with twice the steps, and on two threads 32, which keeps less
    of the second core busy); ``long``: the shipped model's 2.5M-parameter U-Net (base 48) for runs of hours on
    a CPU, resumable (v prediction, min-SNR-5, batch 64, lr 2e-3 on a cosine decay over the steps planned from the
    clock, power EMA sigma_rel 0.1): at 150 minutes of one core it scored level with the cpu network trained the
    same way (FID 7.5 against 6.7 on 1,000 samples, inside the spread of the seeds; below it on the 250-sample
    curve from the 75th minute on), and it continues the shipped weights with ``--init-from``; ``gpu``: larger,
    for an accelerator; ``tiny``: tests.
    ``benchmarks/time_to_quality.py`` compares recipes for them.
    """
    presets = {
        "cpu": TrainConfig(model=UNetConfig(base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1,
                                            attention_levels=(False, False, True), num_classes=10, dropout=0.0),
                           prediction="v", weighting="min_snr", batch_size=64, lr=2e-3, warmup_steps=100,
                           ema_decay=0.999, minutes=30),
        "long": TrainConfig(model=UNetConfig(base_channels=48, channel_mults=(1, 2, 2), num_res_blocks=1,
                                             attention_levels=(False, False, True), num_classes=10, dropout=0.0),
                            prediction="v", weighting="min_snr", batch_size=64, lr=2e-3, lr_schedule="cosine",
                            ema_sigma_rel=0.1, warmup_steps=100, minutes=150, checkpoint_every=250, sample_every=1000),
        "gpu": TrainConfig(model=UNetConfig(base_channels=64, channel_mults=(1, 2, 2), num_res_blocks=2,
                                            attention_levels=(False, True, True), num_classes=10, dropout=0.1),
                           batch_size=256, lr=2e-4, warmup_steps=500, ema_decay=0.9995, max_steps=40_000),
        "tiny": TrainConfig(model=UNetConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                                             attention_levels=(False, True), num_heads=2, num_classes=10, dropout=0.0),
                            batch_size=8, lr=1e-3, warmup_steps=2, ema_decay=0.9, max_steps=10, num_steps=100),
    }
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; allowed: {', '.join(presets)}")
    return replace(presets[name], **overrides)


# ---------------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------------
def loss_weights(t: torch.Tensor, schedule: NoiseSchedule, prediction: str, weighting: str, gamma: float) -> torch.Tensor:
    """Per-sample loss weights. min-SNR-gamma (Hang et al. 2023, eq. 8 and sec. 3.4), written per target:
    eps: min(SNR, gamma) / SNR,  v: min(SNR, gamma) / (SNR + 1),  x0: min(SNR, gamma)."""
    if weighting == "uniform":
        return torch.ones(len(t), dtype=torch.float32)
    snr = schedule.snr[t.cpu()]
    clipped = snr.clamp(max=gamma)
    if prediction == "eps":
        w = torch.where(snr > 0, clipped / snr.clamp(min=1e-20), torch.ones_like(snr))  # the limit SNR -> 0 is 1
    elif prediction == "v":
        w = clipped / (snr + 1)
    else:
        w = clipped
    return w.float()


def eps_loss_weight(t: torch.Tensor, schedule: NoiseSchedule, prediction: str) -> torch.Tensor:
    """How much a squared error in ``prediction`` weighs in eps terms at step t: at a fixed x_t every target is an
    affine function of eps, so ||target - pred||^2 = c_t ||eps - eps_hat||^2 with (Kingma & Gao 2023, sec. 2)
    eps: 1,  x0: 1 / SNR,  v: 1 + 1 / SNR,  flow (eps - x0): (1 + 1 / sqrt(SNR))^2."""
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {prediction!r}; allowed: {', '.join(PREDICTION_TYPES)}")
    snr = schedule.snr[t.cpu()]
    return {"eps": torch.ones_like(snr), "x0": 1 / snr, "v": 1 + 1 / snr, "flow": (1 + snr.rsqrt()) ** 2}[prediction]


def objective_density(cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The one-loss view of a training config (Kingma & Gao 2023, eq. 7): its expected loss is the integral over
    log-SNR lambda of w(lambda) ||eps - eps_hat||^2, with w = (density of lambda under the t-draw) x (loss weight)
    x :func:`eps_loss_weight`. Returns lambda at the schedule's steps and w there (steps of infinite lambda, and
    the two end steps whose cells are half-open, left out)."""
    schedule = get_schedule(cfg.schedule, cfg.num_steps, zero_terminal_snr=cfg.zero_terminal_snr)
    t = torch.arange(cfg.num_steps)
    logsnr = schedule.snr.log()
    edges = (logsnr[1:] + logsnr[:-1]) / 2  # lambda's cell of step k lies between edges k - 1 and k (decreasing)
    inner = t[1:-1][torch.isfinite(edges[:-1]) & torch.isfinite(edges[1:])]
    upper, lower = edges[inner - 1], edges[inner]
    if cfg.timesteps == "uniform":
        mass = torch.full((len(inner),), 1 / cfg.num_steps, dtype=torch.float64)
    else:  # logsnr_timesteps sends a draw to its nearest step: the normal's mass over the step's cell
        normal = torch.distributions.Normal(torch.tensor(cfg.logsnr_mean, dtype=torch.float64), cfg.logsnr_std)
        mass = normal.cdf(upper) - normal.cdf(lower)
    w = mass / (upper - lower) * loss_weights(inner, schedule, cfg.prediction, cfg.weighting, cfg.min_snr_gamma)
    return logsnr[inner], w * eps_loss_weight(inner, schedule, cfg.prediction)


def diffusion_loss(model, x0, t, eps, labels, schedule: NoiseSchedule, cfg: TrainConfig) -> torch.Tensor:
    """The weighted regression loss of one batch (DDPM Algorithm 1, line 5, generalised)."""
    xt = q_sample(x0, t, eps, schedule)
    target = {"eps": eps, "x0": x0, "v": v_from_x0_eps(x0, eps, t, schedule), "flow": eps - x0}[cfg.prediction]
    pred = model(xt, t, labels).float()
    criterion = {"l2": F.mse_loss, "l1": F.l1_loss, "huber": F.smooth_l1_loss}[cfg.loss]
    per_sample = criterion(pred, target.float(), reduction="none").flatten(1).mean(1)
    weights = loss_weights(t, schedule, cfg.prediction, cfg.weighting, cfg.min_snr_gamma).to(per_sample.device)
    return (weights * per_sample).mean()


# ---------------------------------------------------------------------------------------------------
# What each step sees: a pure function of (seed, step)
# ---------------------------------------------------------------------------------------------------
def _step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 8 + stream)


def batch_indices(num_images: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Indices of the global batch at ``step``: epochs are seeded permutations, the last partial batch dropped."""
    per_epoch = num_images // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} is larger than the dataset ({num_images} images)")
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(num_images, generator=_step_generator(seed, epoch, stream=7))
    return perm[k * batch_size:(k + 1) * batch_size]


def logsnr_timesteps(u: torch.Tensor, schedule: NoiseSchedule, mean: float, std: float) -> torch.Tensor:
    """The steps whose log-SNR is nearest to log-SNR ~ N(mean, std^2), from standard normal draws ``u``.

    Drawing t this way instead of uniformly weights the loss by the density of log-SNR (Kingma & Gao 2023,
    sec. 3): a normal over log-SNR is EDM's log-normal noise level (Karras et al. 2022, sec. 5) on the VP schedule.
    """
    logsnr = schedule.snr.log()  # decreasing in t
    target = (mean + std * u.double()).clamp(float(logsnr[-1]), float(logsnr[0]))
    t = torch.searchsorted(-logsnr, -target).clamp(max=schedule.num_steps - 1)  # first t with logsnr[t] <= target
    nearer_prev = (t > 0) & ((logsnr[(t - 1).clamp(min=0)] - target).abs() < (logsnr[t] - target).abs())
    return torch.where(nearer_prev, t - 1, t)


def step_noise(cfg: TrainConfig, step: int, shape: tuple[int, ...],
               schedule: NoiseSchedule | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """t, eps and the class-dropout mask of the global batch at ``step`` (drawn on the CPU).

    ``schedule`` is needed when ``cfg.timesteps`` is ``logsnr_normal`` (default: the one ``cfg`` names)."""
    g = _step_generator(cfg.seed, step, stream=0)
    if cfg.timesteps == "uniform":
        t = torch.randint(0, cfg.num_steps, (shape[0],), generator=g)
    else:
        schedule = schedule or get_schedule(cfg.schedule, cfg.num_steps, zero_terminal_snr=cfg.zero_terminal_snr)
        t = logsnr_timesteps(torch.randn(shape[0], generator=g, dtype=torch.float64), schedule,
                             cfg.logsnr_mean, cfg.logsnr_std)
    eps = torch.randn(shape, generator=g)
    drop = torch.rand(shape[0], generator=g) < cfg.class_dropout
    return t, eps, drop


# ---------------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed(cfg: TrainConfig) -> Dist:
    """Single process, or one of ``torchrun --nproc_per_node=K`` processes (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=get_device(cfg.device))
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = get_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the {world} processes")
    return Dist(rank=dist.get_rank(), world=world, device=device)


# ---------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    model: UNet  # the raw weights
    ema: UNet  # the EMA weights (use these for sampling)
    step: int
    history: list[tuple[int, float]]
    out_dir: Path
    interrupted: bool = False
    samples: list[Path] = field(default_factory=list)  # the sample grids of the run so far, by step (sample_every)


def _amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``TrainConfig.amp`` on ``device`` (None: train in fp32). Weights and the optimizer stay fp32."""
    if mode == "auto":
        return training_autocast_dtype(device)
    if mode == "fp16" and device.type == "cpu":
        raise ValueError("amp='fp16' needs a GPU; on the CPU use amp='bf16' (fast where the CPU has AMX or AVX512-BF16) or 'off'")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[mode]


def check_finite(loss: torch.Tensor, step: int, resume_path: Path, advice: str) -> None:
    """Stop a run whose loss is NaN or infinite, before anything is written over the last good checkpoint."""
    if not torch.isfinite(loss):
        raise TrainingDivergedError(f"loss is {loss.item()} at step {step}; stopped without writing, so {resume_path} "
                                    f"still holds the last good checkpoint. {advice}")


def optimizer_step(loss: torch.Tensor, model: torch.nn.Module, opt, scaler, sched, grad_clip: float | None) -> None:
    """Backward (the loss scaled when training in fp16), clip the gradient norm, step the optimizer and the lr schedule."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(opt)
    scaler.update()
    sched.step()


def _total_steps(cfg: TrainConfig, num_images: int) -> int | None:
    """The run's length in steps from max_steps / epochs; None when only the clock (minutes) bounds it."""
    steps = [cfg.max_steps] if cfg.max_steps is not None else []
    if cfg.epochs is not None:
        steps.append(math.ceil(cfg.epochs * (num_images // cfg.batch_size)))
    return min(steps) if steps else None


def _agree(value: int, dist: Dist) -> int:
    """Process 0's value in every process: under torchrun each one times its own steps, but all follow one plan."""
    if dist.world == 1:
        return value
    import torch.distributed as tdist

    tensor = torch.tensor([value], device=dist.device)
    tdist.broadcast(tensor, src=0)
    return int(tensor.item())


def _any_process(flags: tuple[bool, ...], dist: Dist) -> tuple[bool, ...]:
    """Each flag true in every process when it is true in one: under torchrun each process reads its own clock
    and signals, but all must stop after the same step (one left alone would wait for the others' gradients)."""
    if dist.world == 1:
        return flags
    import torch.distributed as tdist

    tensor = torch.tensor([int(f) for f in flags], device=dist.device)
    tdist.all_reduce(tensor, op=tdist.ReduceOp.MAX)
    return tuple(bool(f) for f in tensor.tolist())


def _sigterm_sets(flag: threading.Event):
    """Make ``kill PID`` (SIGTERM) set ``flag`` instead of ending the process, and return what undoes it. A run
    started with ``nohup ... &`` ignores Ctrl-C's SIGINT, so SIGTERM is how a script stops it cleanly. Only the
    main thread may set a handler: elsewhere SIGTERM keeps its default."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: flag.set())
    return lambda: signal.signal(signal.SIGTERM, previous)


def plan_steps(step: int, seconds_per_step: float, seconds_left: float) -> int:
    """The last step of a minutes budget, fixed once from the speed measured over the run's first minutes.

    A decaying learning rate needs to know where the run ends. Planning it once, and saving it in the
    checkpoint, keeps the schedule a function of the step alone: a resumed run ends at the same step and
    gets the same weights, however busy the machine is afterwards. The trainer times the steps from the middle
    of the warm-up to ``PLAN_TIMED_SHARE`` of the remaining budget past its end (the rate stays at its peak
    meanwhile): a minute of timing was seen 17 % off on a shared machine, where a tenth of the budget averages
    the slow stretches out."""
    return step + max(1, int(seconds_left / seconds_per_step))


def lr_factor(step: int, warmup_steps: int, total: int | None, kind: str) -> float:
    """The learning rate at ``step`` over the peak: a linear warm-up, then ``kind`` until step ``total``.

    constant: 1; cosine: (1 + cos(pi p)) / 2 (Loshchilov & Hutter 2017, eq. 5 with eta_min = 0); linear: 1 - p;
    with p = (step - warmup) / (total - warmup) the fraction of the decay done. No total yet: 1 after the warm-up.
    """
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    if kind == "constant" or total is None or step < warmup_steps:
        return warm
    p = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
    return 0.5 * (1 + math.cos(math.pi * p)) if kind == "cosine" else 1.0 - p


def power_ema_gamma(sigma_rel: float) -> float:
    """The exponent gamma of the power-function EMA whose relative width is ``sigma_rel``.

    sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) (Karras et al. 2024, eq. 3), which falls from
    0.289 at gamma = 0 towards 0 as gamma grows; solved by bisection.
    """
    def width(g):
        return math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))
    lo, hi = 0.0, 1.0
    while width(hi) > sigma_rel:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if width(mid) > sigma_rel else (lo, mid)
    return (lo + hi) / 2


def power_ema(sigma_rel: float):
    """The update theta_ema <- beta theta_ema + (1 - beta) theta with beta = (1 - 1/n)^(gamma + 1) at update n.

    The power-function EMA of Karras et al. 2024 (sec. 3.1, eq. 2): its average always spans the same fraction
    of the run so far (``sigma_rel``), so it suits a run of any length without a decay chosen for it.
    """
    gamma = power_ema_gamma(sigma_rel)

    @torch.no_grad()
    def update(ema_params, params, num_averaged):
        n = int(num_averaged) + 1  # AveragedModel passes the updates made so far; this is update n
        _lerp_floats(ema_params, params, 1 - (1 - 1 / n) ** (gamma + 1))
    return update


def _lerp_floats(ema_params, params, weight: float) -> None:
    """ema <- ema + weight (param - ema) for floating tensors; integer buffers (BatchNorm's counter) are copied."""
    pairs = list(zip(ema_params, params, strict=True))
    floats = [(e, p) for e, p in pairs if e.is_floating_point()]
    if floats:
        torch._foreach_lerp_([e for e, _ in floats], [p for _, p in floats], weight)
    for e, p in pairs:
        if not e.is_floating_point():
            e.copy_(p)


def ema_with_warmup(decay: float):
    """The EMA update theta_ema <- d theta_ema + (1 - d) theta with d = min(decay, (1 + n) / (10 + n)) at update n.

    The ramp (as in diffusers' EMAModel) keeps a short run's average from remembering the random initial
    weights: with a fixed 0.999, 8% of the average is still the initialisation after 2,500 steps.
    """
    @torch.no_grad()
    def update(ema_params, params, num_averaged):
        n = int(num_averaged)
        _lerp_floats(ema_params, params, 1 - min(decay, (1 + n) / (10 + n)))
    return update


# What a resumed run may change. Everything that defines the model and what it learns is fixed: changing it
# would keep training the old weights on another problem. The rest applies from the resumed step on.
FIXED_ON_RESUME = ("model", "schedule", "num_steps", "zero_terminal_snr", "prediction", "loss", "weighting",
                   "min_snr_gamma", "timesteps", "logsnr_mean", "logsnr_std", "batch_size", "class_dropout", "seed",
                   "lr_schedule", "warmup_steps", "ema_sigma_rel", "init_from", "autoencoder")
APPLIED_ON_RESUME = ("lr", "weight_decay", "grad_clip", "ema_decay", "max_steps", "epochs", "minutes", "device", "amp",
                     "compile", "channels_last", "out_dir", "checkpoint_every", "log_every", "sample_every", "snapshot_every")


def init_weights(cfg: TrainConfig, schedule: NoiseSchedule, autoencoder_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The weights of the model folder ``cfg.init_from``, checked to be this run's network, objective and space
    (pixels, or the latents of the same autoencoder: ``autoencoder_sha256`` of this run's)."""
    pipe = DiffusionPipeline.from_pretrained(cfg.init_from, device="cpu")
    their_autoencoder = (pipe.metadata or {}).get(AUTOENCODER, {}).get("weights_sha256")
    theirs = {**asdict(pipe.model.config), "prediction": pipe.prediction, "schedule": schedule_record(pipe.schedule),
              "autoencoder sha256": their_autoencoder}
    ours = {**asdict(cfg.model), "prediction": cfg.prediction, "schedule": schedule_record(schedule),
            "autoencoder sha256": autoencoder_sha256}
    differ = [f"{k}: {theirs[k]!r} there, {ours[k]!r} here" for k in ours if theirs[k] != ours[k]]
    if differ:
        raise ValueError(f"init_from {cfg.init_from} does not fit this run: {'; '.join(differ)}. Start from a model "
                         f"of the same network, prediction and schedule (its config.json says which)")
    return pipe.model.state_dict()


def resume_changes(saved: TrainConfig, cfg: TrainConfig, planned: bool) -> list[str]:
    """The options ``cfg`` changes from the run it resumes, as "name: old -> new"; a ValueError for any that may
    not change (naming the option and both values). ``planned``: the run's length was planned from its minutes."""
    old, new = saved.to_dict(), cfg.to_dict()
    fixed = [k for k in FIXED_ON_RESUME if old[k] != new[k]]
    if planned and old["minutes"] != new["minutes"]:
        fixed.append("minutes")
    if fixed:
        lines = "; ".join(f"{k}: {old[k]!r} in the checkpoint, {new[k]!r} now" for k in fixed)
        why = (" (the run planned its steps from its first minutes budget)" if "minutes" in fixed else "")
        raise ValueError(f"cannot resume {cfg.out_dir} with a changed {', '.join(fixed)}{why}: {lines}. "
                         f"Use the checkpoint's values, or start a new run (another out_dir, or no resume: --no-resume)")
    assert set(FIXED_ON_RESUME) | set(APPLIED_ON_RESUME) == set(new), "every option is fixed or applied on resume"
    return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in APPLIED_ON_RESUME if old[k] != new[k] and k not in ("device", "out_dir")]


def load_resume(path: Path, device: torch.device) -> dict:
    """The state :func:`save_resume` wrote, or a CheckpointError that says what to do with a damaged file."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        missing = [k for k in ("config", "model", "ema", "optimizer", "scheduler", "step", "history") if k not in state]
    except Exception as err:  # truncated zip, not a torch file, unpickling refused: all mean the same to the user
        raise CheckpointError(f"{path} cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:120]}); it is "
                              "damaged or not a resume checkpoint. The model folder beside it (config.json, "
                              "model.safetensors) holds the EMA weights of the last good checkpoint; to train "
                              "again, move the file away or pass --no-resume") from None
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}: not a resume checkpoint of this trainer")
    return state


def save_resume(path: Path, cfg: TrainConfig, model: UNet, ema: AveragedModel, opt, sched, step: int,
                history: list[tuple[int, float]], total_steps: int | None = None, autoencoder_sha256: str | None = None) -> None:
    """Atomically write the resume checkpoint (read back with ``torch.load(weights_only=True)``).

    ``total_steps``: the run's planned length, once known (a minutes budget with a decaying schedule).
    ``autoencoder_sha256``: a latent run's autoencoder weights, checked on resume (the path alone could be retrained)."""
    state = {
        "config": json.dumps(cfg.to_dict()),
        "model": model.state_dict(),
        "ema": ema.module.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "step": step,
        "history": torch.tensor(history, dtype=torch.float64).reshape(-1, 2),
        "total_steps": -1 if total_steps is None else total_steps,
        "autoencoder_sha256": autoencoder_sha256 or "",
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


# ---------------------------------------------------------------------------------------------------
# What a run shows while it trains: the loss curve and samples over training
# ---------------------------------------------------------------------------------------------------
GRID_COLUMNS, GRID_STEPS = 8, 50


def save_loss_csv(path: Path, history: list[tuple[int, float]]) -> None:
    """Atomically write the logged losses as CSV: a ``step,loss`` header, then one row per logged step."""
    text = "step,loss\n" + "".join(f"{s},{v!r}\n" for s, v in history)
    atomic_write(path, lambda tmp: tmp.write_text(text))


def plot_loss(history: list[tuple[int, float]], title: str = "Training loss"):
    """A :class:`lessons_lib.viz.Figure` of the logged loss against the step (log scale) and its running mean."""
    from .viz import Figure  # matplotlib is loaded only when a figure is drawn

    if not history:
        raise ValueError("history is empty: nothing was logged yet (the first entry comes after log_every steps)")
    steps, losses = torch.tensor(history, dtype=torch.float64).T
    window = max(1, len(losses) // 50)
    fig = Figure(figsize=(6.5, 3), layout="constrained")
    ax = fig.subplots()
    ax.plot(steps, losses, lw=0.5, alpha=0.4 if window > 1 else 1.0, label="logged loss")
    if window > 1:
        ax.plot(steps[window - 1:], losses.unfold(0, window, 1).mean(1), lw=1.5, label=f"running mean of {window}")
    ax.set(xlabel="step", ylabel="loss", yscale="log", title=title)
    ax.legend()
    return fig


@torch.no_grad()
def sample_grid(model: UNet, cfg: TrainConfig, image_size: int = 28, columns: int = GRID_COLUMNS, steps: int = GRID_STEPS,
                seed: int | None = None, autoencoder: Autoencoder | None = None) -> torch.Tensor:
    """The fixed grid drawn during training: one row per class x ``columns`` (unconditional: ``columns`` x ``columns``).

    Image i starts from the noise of seed ``seed + i`` (default ``cfg.seed``); a class-conditional grid repeats
    the first row's noises in every row, so rows differ only by their class. DDIM is deterministic, so a run's
    grids differ only by the weights, and the noise comes from its own seeded generators: the training
    randomness is untouched. Returns images (rows * columns, C, H, W) in [-1, 1], row by row; a latent model's
    latents decoded by its ``autoencoder``.
    """
    if cfg.autoencoder and autoencoder is None:
        raise ValueError(f"this run learns the latents of {cfg.autoencoder}: pass autoencoder= to decode its grid")
    device = next(model.parameters()).device
    rows, conditional = cfg.model.num_classes or columns, cfg.model.num_classes is not None
    side = image_size if autoencoder is None else autoencoder.config.latent_shape(image_size)[-1]
    x_T = randn((columns if conditional else rows * columns, cfg.model.in_channels, side, side),
                seed=cfg.seed if seed is None else seed, device=device)
    x_T = x_T.repeat(rows, 1, 1, 1) if conditional else x_T
    labels = torch.arange(rows, device=device).repeat_interleave(columns) if conditional else None
    schedule = get_schedule(cfg.schedule, cfg.num_steps, zero_terminal_snr=cfg.zero_terminal_snr)
    sampler = get_sampler("ddim", schedule, min(steps, cfg.num_steps), spacing="trailing", prediction=cfg.prediction,
                          clip_x0=autoencoder is None)  # latents are not confined to [-1, 1]
    was_training = model.training
    model.eval()
    try:
        images = sample(model, x_T, sampler, labels, progress=False, clip=autoencoder is None).images
        return images if autoencoder is None else autoencoder.from_latent(images.to(device)).clamp(-1, 1)
    finally:
        model.train(was_training)


def save_sample_grid(model: UNet, cfg: TrainConfig, out_dir: Path, step: int, image_size: int,
                     classes: tuple[str, ...] = (), autoencoder: Autoencoder | None = None) -> Path:
    """Atomically write :func:`sample_grid` of ``model`` to ``out_dir/samples/step_XXXXXXX.png``, rows labelled by class."""
    from .viz import show_grid  # matplotlib is loaded only when a grid is drawn

    steps = min(GRID_STEPS, cfg.num_steps)
    images = sample_grid(model, cfg, image_size, GRID_COLUMNS, steps, autoencoder=autoencoder)
    conditional = cfg.model.num_classes is not None
    fig = show_grid(images.cpu(), nrow=GRID_COLUMNS, title=f"EMA samples at step {step} (DDIM {steps} steps)",
                    row_labels=list(classes) if conditional and len(classes) == cfg.model.num_classes else None,
                    xlabel="starting noise (the same in every row)" if conditional else None)
    return atomic_write(_grid_path(out_dir, step), lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def _grid_path(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / SAMPLES_DIR / f"step_{step:07d}.png"


def _earlier_samples(out_dir: Path, up_to: int) -> list[Path]:
    """The grids a resumed run wrote up to step ``up_to``, by step."""
    stems = (p.stem.removeprefix("step_") for p in (Path(out_dir) / SAMPLES_DIR).glob("step_*.png"))
    return [_grid_path(out_dir, s) for s in sorted(int(d) for d in stems if d.isdigit()) if s <= up_to]


def train(cfg: TrainConfig, dataset: ImageDataset | None = None, resume: bool = True, progress: bool = True) -> TrainResult:
    """Train (or continue training) the model described by ``cfg``; checkpoints go to ``cfg.out_dir``.

    Writes ``resume.pt``, ``loss.csv`` and the EMA weights as ``model.safetensors`` + ``config.json`` every
    ``checkpoint_every`` steps, on Ctrl-C, on ``kill PID`` (SIGTERM, after the step it is on) and at the end, and
    with ``sample_every`` a grid of EMA samples (:func:`save_sample_grid`) every that many steps and at the end.
    Only process 0 writes.

    With ``cfg.autoencoder`` the network learns the autoencoder's latents of the images (each image's posterior mean
    times the scale factor, encoded once at the start) and the model folder holds the autoencoder beside it.
    """
    dist = _setup_distributed(cfg)
    out_dir = writable_folder(cfg.out_dir, "out_dir")
    amp_dtype = _amp_dtype(cfg.amp, dist.device)
    dataset = dataset or load_fashion_mnist("train")
    if cfg.batch_size > len(dataset):
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the dataset ({len(dataset)} images)")
    schedule = get_schedule(cfg.schedule, cfg.num_steps, zero_terminal_snr=cfg.zero_terminal_snr)
    images, labels = dataset.images.to(dist.device), dataset.labels.to(dist.device)  # uint8: 47 MB for Fashion-MNIST
    image_size, autoencoder, autoencoder_sha256 = images.shape[-1], None, None
    if cfg.autoencoder:
        autoencoder = load_autoencoder(cfg.autoencoder, dist.device)
        autoencoder_sha256 = read_config(cfg.autoencoder)[AUTOENCODER]["weights_sha256"]
        latent_channels = autoencoder.config.latent_channels
        if cfg.model.in_channels != latent_channels:
            raise ValueError(f"the autoencoder {cfg.autoencoder} gives latents of {latent_channels} channels: set the "
                             f"network's in_channels to {latent_channels} (got {cfg.model.in_channels})")
        images = encode_images(autoencoder, images, progress=progress and dist.main)  # float latents, unit variance

    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    model = UNet(cfg.model).to(dist.device)
    if cfg.init_from:
        load_state(model, init_weights(cfg, schedule, autoencoder_sha256))
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    averaging = power_ema(cfg.ema_sigma_rel) if cfg.ema_sigma_rel is not None else ema_with_warmup(cfg.ema_decay)
    ema = AveragedModel(model, multi_avg_fn=averaging, use_buffers=True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = _total_steps(cfg, len(images))  # None: the clock decides, or the plan made in the run's first minutes
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.warmup_steps, total, cfg.lr_schedule))
    step, history = 0, []
    resume_path = out_dir / RESUME
    if resume and resume_path.exists():
        state = load_resume(resume_path, dist.device)
        saved = TrainConfig.from_dict(json.loads(state["config"]))
        saved_autoencoder = state.get("autoencoder_sha256") or None
        if autoencoder_sha256 and saved_autoencoder and saved_autoencoder != autoencoder_sha256:
            raise ValueError(f"the autoencoder in {cfg.autoencoder} has changed since this run began (weights sha256 "
                             f"{saved_autoencoder[:12]}... then, {autoencoder_sha256[:12]}... now): the network learnt the "
                             "old one's latents. Restore that autoencoder, or start a new run on the new one")
        kept_plan = cfg.plans_from_clock() and int(state.get("total_steps", -1)) > 0
        changes = resume_changes(saved, cfg, kept_plan)
        load_state(model, state["model"])
        load_state(ema.module, state["ema"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, history = int(state["step"]), [(int(s), float(v)) for s, v in state["history"].tolist()]
        ema.n_averaged.fill_(max(1, step))
        if kept_plan:
            total = int(state["total_steps"])  # the plan of the first run, kept
        sched.base_lrs = [cfg.lr] * len(opt.param_groups)
        for group in opt.param_groups:  # a changed lr or weight decay applies from here on
            group.update(initial_lr=cfg.lr, weight_decay=cfg.weight_decay,
                         lr=cfg.lr * lr_factor(step, cfg.warmup_steps, total, cfg.lr_schedule))
        if changes and dist.main:
            print(f"resuming {resume_path} at step {step} with: {'; '.join(changes)}")
    samples = _earlier_samples(out_dir, step) if step and cfg.sample_every else []

    net = model
    if dist.world > 1:
        device_ids = [dist.device.index] if dist.device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if cfg.compile:
        net = torch.compile(net)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    conditional = cfg.model.num_classes is not None
    per_rank = cfg.batch_size // dist.world
    shard = slice(dist.rank * per_rank, (dist.rank + 1) * per_rank)
    planned_run = cfg.plans_from_clock()  # the minutes become a step count, planned once: then the clock stops counting
    planning = planned_run and total is None
    if dist.main:
        end = total if total is not None else "a step planned from its first minutes" if planning else "the time limit"
        print(f"training {count_parameters(model) / 1e6:.2f}M parameters on {dist.device} x{dist.world}, "
              f"batch {cfg.batch_size}, from step {step} to {end}")

    record = pipeline_record(schedule, cfg.prediction, image_size, dataset.classes)

    def save_ema(path: Path):
        save_pretrained(ema.module, path, metadata={"pipeline": record, "train": cfg.to_dict(), "step": step, "weights": "ema"},
                        autoencoder=autoencoder)

    def write_checkpoint():
        """resume.pt, loss.csv and the EMA model folder that ``sample`` loads: a run stopped any way leaves both."""
        save_resume(resume_path, cfg, model, ema, opt, sched, step, history, total, autoencoder_sha256)
        save_loss_csv(out_dir / LOSS_CSV, history)
        save_ema(out_dir)

    bar = tqdm(total=total, initial=step, disable=not (progress and dist.main), desc="training", unit="step")
    start, seen, interrupted = time.perf_counter(), 0, False
    timed_from, timer, plan_at = max(step, cfg.warmup_steps // 2), None, None  # planning: timed from mid-warm-up
    stop = threading.Event()  # set by SIGTERM: the run ends between two steps and saves, as on Ctrl-C
    restore_sigterm = _sigterm_sets(stop)
    model.train()
    try:
        while total is None or step < total:
            clock_ends = cfg.minutes is not None and not (planned_run and total is not None)  # a plan ends at its step
            out_of_time, stopped = _any_process((clock_ends and time.perf_counter() - start >= 60 * cfg.minutes,
                                                 stop.is_set()), dist)
            if out_of_time:
                break
            if stopped:
                interrupted = True
                break
            if planning and step == timed_from:
                timer = time.perf_counter()
            if planning and timer is not None and step >= max(cfg.warmup_steps, timed_from + 1):
                now = time.perf_counter()
                seconds_per_step, seconds_left = (now - timer) / (step - timed_from), 60 * cfg.minutes - (now - start)
                if plan_at is None:  # a first estimate sets the step that ends the timing, the same in every process
                    plan_at = _agree(step + int(PLAN_TIMED_SHARE * seconds_left / seconds_per_step), dist)
                if step >= plan_at:
                    total = _agree(plan_steps(step, seconds_per_step, seconds_left), dist)
                    bar.total, planning = total, False
                    if dist.main:
                        print(f"planned {total} steps for the {cfg.minutes:g}-minute budget")
            idx = batch_indices(len(images), cfg.batch_size, cfg.seed, step)[shard].to(dist.device)
            t, eps, drop = (v[shard] for v in step_noise(cfg, step, (cfg.batch_size, *images.shape[1:]), schedule))
            x0 = to_model(images[idx]) if autoencoder is None else images[idx]
            y = torch.where(drop.to(dist.device), cfg.model.num_classes, labels[idx]) if conditional else None
            if cfg.channels_last:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            torch.manual_seed(cfg.seed * 1_000_003 + step * 64 + dist.rank)  # dropout masks, per step and process
            with torch.autocast(dist.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = diffusion_loss(net, x0, t.to(dist.device), eps.to(dist.device), y, schedule, cfg)
            check_finite(loss, step, resume_path, f"Lower lr (now {cfg.lr}) or set grad_clip (now {cfg.grad_clip}).")
            optimizer_step(loss, model, opt, scaler, sched, cfg.grad_clip)
            ema.update_parameters(model)
            step += 1
            seen += cfg.batch_size
            if step % cfg.log_every == 0 or step == total:
                history.append((step, loss.item()))
                bar.set_postfix(loss=f"{history[-1][1]:.4f}", img_s=f"{seen / (time.perf_counter() - start):.0f}")
            bar.update(1)
            if dist.main and step % cfg.checkpoint_every == 0:
                write_checkpoint()
            if dist.main and cfg.snapshot_every and step % cfg.snapshot_every == 0:
                save_ema(out_dir / SNAPSHOTS_DIR / f"step_{step:07d}")
            if dist.main and cfg.sample_every and step % cfg.sample_every == 0:
                samples.append(save_sample_grid(ema.module, cfg, out_dir, step, image_size, dataset.classes, autoencoder))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        restore_sigterm()
    if dist.main:
        if interrupted:
            print(f"interrupted at step {step}: saving {resume_path}; run again to resume")
        write_checkpoint()
        if cfg.sample_every and step and not interrupted and _grid_path(out_dir, step) not in samples:
            samples.append(save_sample_grid(ema.module, cfg, out_dir, step, image_size, dataset.classes, autoencoder))  # the end
    return TrainResult(model.eval(), ema.module.eval(), step, history, out_dir, interrupted, samples)  # ready to sample
