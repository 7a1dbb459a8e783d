"""Training the autoencoder of latent diffusion: a small loop of its own beside :mod:`lessons_lib.train`.

Its objective (reconstruction + KL + an optional feature loss, :func:`lessons_lib.autoencoder.autoencoder_loss`) has
no timestep, noise schedule, class labels or EMA, so it does not run through the diffusion trainer's loop; it uses
that trainer's parts: the seeded batch of each step, the warm-up and decay of the learning rate, bf16 autocast where
the CPU has it, atomic checkpoints and exact resume (N steps + resume + M steps gives the weights of N + M steps).
It runs in one process: the course's autoencoders train in minutes on two cores.

At every checkpoint the run folder holds ``resume.pt``, ``loss.csv`` and a loadable autoencoder folder
(``autoencoder.safetensors`` + ``config.json``) whose ``scale_factor`` is measured on a fixed set of training images.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .autoencoder import Autoencoder, AutoencoderConfig, autoencoder_loss, measure_scale_factor, save_autoencoder
from .checkpoint import CheckpointError, atomic_write, load_state, writable_folder
from .config import BUILD_DIR
from .data import ImageDataset, load_fashion_mnist, to_model
from .train import (
    AMP_MODES,
    LOSS_CSV,
    LR_SCHEDULES,
    RESUME,
    _amp_dtype,
    _step_generator,
    batch_indices,
    check_finite,
    lr_factor,
    optimizer_step,
    save_loss_csv,
)
from .unet import count_parameters

# What a resumed run may not change: the network and what it learns from; everything else applies from the resumed step.
FIXED_ON_RESUME = ("model", "batch_size", "seed", "lr_schedule", "warmup_steps", "scale_images")


@dataclass
class AutoencoderTrainConfig:
    """Everything an autoencoder run needs; saved with every checkpoint."""

    model: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 100
    lr_schedule: str = "cosine"  # after the warm-up: constant, or cosine / linear decay to 0 at the last step
    grad_clip: float | None = 1.0
    max_steps: int | None = None  # the run's length: max_steps, or epochs of the training images
    epochs: float | None = None
    seed: int = 0
    device: str | None = None
    amp: str = "auto"  # as the diffusion trainer: bf16 autocast on CPUs with AMX / AVX512-BF16, else fp32
    out_dir: str = str(BUILD_DIR / "runs" / "autoencoder")
    checkpoint_every: int = 500
    log_every: int = 25
    scale_images: int = 5000  # the first images of a seeded permutation of the training set measure scale_factor

    def __post_init__(self):
        if isinstance(self.model, dict):
            self.model = AutoencoderConfig(**self.model)
        for name, value, allowed in (("amp", self.amp, AMP_MODES), ("lr_schedule", self.lr_schedule, LR_SCHEDULES)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError(f"give exactly one of max_steps and epochs (the run's length), "
                             f"got {self.max_steps} and {self.epochs}")
        if not 0 < self.lr < float("inf"):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if self.grad_clip is not None and not 0 < self.grad_clip < float("inf"):
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.epochs is not None and not 0 < self.epochs < float("inf"):
            raise ValueError(f"epochs must be a finite number > 0, got {self.epochs}")
        for name, low in (("batch_size", 1), ("max_steps", 1), ("warmup_steps", 0), ("checkpoint_every", 1),
                          ("log_every", 1), ("scale_images", 2)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < low):
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must lie in [0, 2**63), got {self.seed}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AutoencoderTrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def total_steps(self, num_images: int) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return max(1, round(self.epochs * (num_images // self.batch_size)))


@dataclass
class AutoencoderTrainResult:
    model: Autoencoder  # in eval mode, scale_factor measured
    step: int
    history: list[tuple[int, float]]
    out_dir: Path
    interrupted: bool = False


def _without_scale(cfg: AutoencoderTrainConfig) -> dict:
    d = cfg.to_dict()
    d["model"] = {k: v for k, v in d["model"].items() if k != "scale_factor"}  # measured by the run, not chosen
    return d


def resume_changes(saved: AutoencoderTrainConfig, cfg: AutoencoderTrainConfig) -> list[str]:
    """The options ``cfg`` changes from the run it resumes ("name: old -> new"); a ValueError for a fixed one."""
    old, new = _without_scale(saved), _without_scale(cfg)
    fixed = [k for k in FIXED_ON_RESUME if old[k] != new[k]]
    if fixed:
        lines = "; ".join(f"{k}: {old[k]!r} in the checkpoint, {new[k]!r} now" for k in fixed)
        raise ValueError(f"cannot resume {cfg.out_dir} with a changed {', '.join(fixed)}: {lines}. Use the checkpoint's "
                         "values, or start a new run (another out_dir, or resume=False)")
    applied = [k for k in old if k not in (*FIXED_ON_RESUME, "device", "out_dir")]
    return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in applied if old[k] != new[k]]


def _load_resume(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, unpickling refused: all mean the same to the user
        raise CheckpointError(f"{path} cannot be read ({type(err).__name__}); it is damaged or not a resume checkpoint. "
                              "The autoencoder folder beside it holds the last good weights; to train again, move the "
                              "file away or pass resume=False") from None
    missing = [k for k in ("config", "model", "optimizer", "scheduler", "step", "history") if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}: not a resume checkpoint of the autoencoder trainer")
    return state


def train_autoencoder(cfg: AutoencoderTrainConfig, dataset: ImageDataset | None = None, resume: bool = True,
                      progress: bool = True) -> AutoencoderTrainResult:
    """Train (or continue training) the autoencoder of ``cfg``; checkpoints go to ``cfg.out_dir``."""
    from .device import get_device

    device = get_device(cfg.device)
    out_dir = writable_folder(cfg.out_dir, "out_dir")
    amp_dtype = _amp_dtype(cfg.amp, device)
    dataset = dataset or load_fashion_mnist("train")
    images = dataset.images
    if cfg.batch_size > len(images):
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the dataset ({len(images)} images)")
    cfg.model.latent_shape(images.shape[-1])  # a clear error for a side the levels cannot halve
    total = cfg.total_steps(len(images))

    torch.manual_seed(cfg.seed)
    model = Autoencoder(replace(cfg.model)).to(device)  # its own copy of the config: scale_factor is measured into it
    features = None
    if cfg.model.feature_weight > 0:
        from .metrics import default_classifier

        # a copy: the cached classifier that metrics.evaluate uses stays where it is
        features = copy.deepcopy(default_classifier()).to(device).eval().requires_grad_(False).features
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.warmup_steps, total, cfg.lr_schedule))
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)  # fp16 gradients need loss scaling
    step, history = 0, []
    resume_path = out_dir / RESUME
    if resume and resume_path.exists():
        state = _load_resume(resume_path)
        changes = resume_changes(AutoencoderTrainConfig.from_dict(json.loads(state["config"])), cfg)
        load_state(model, state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, history = int(state["step"]), [(int(s), float(v)) for s, v in state["history"].tolist()]
        sched.base_lrs = [cfg.lr] * len(opt.param_groups)
        for group in opt.param_groups:  # a changed lr applies from here on
            group.update(initial_lr=cfg.lr, lr=cfg.lr * lr_factor(step, cfg.warmup_steps, total, cfg.lr_schedule))
        if changes:
            print(f"resuming {resume_path} at step {step} with: {'; '.join(changes)}")
    scale_idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.scale_images]

    def write_checkpoint():
        """resume.pt, loss.csv and the autoencoder folder, its scale_factor measured on the fixed images."""
        model.eval()
        measure_scale_factor(model, to_model(images[scale_idx]).to(device))
        model.train()
        state = {"config": json.dumps(cfg.to_dict()), "model": model.state_dict(), "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict(), "step": step,
                 "history": torch.tensor(history, dtype=torch.float64).reshape(-1, 2)}
        atomic_write(resume_path, lambda tmp: torch.save(state, tmp))
        save_loss_csv(out_dir / LOSS_CSV, history)
        save_autoencoder(model, out_dir, metadata={"train_autoencoder": cfg.to_dict(), "step": step})

    print(f"training a {count_parameters(model) / 1e6:.2f}M-parameter autoencoder (latent "
          f"{cfg.model.latent_shape(images.shape[-1])}) on {device}, batch {cfg.batch_size}, from step {step} to {total}")
    bar = tqdm(total=total, initial=step, disable=not progress, desc="autoencoder", unit="step")
    start, seen, interrupted = time.perf_counter(), 0, False
    model.train()
    try:
        while step < total:
            x = to_model(images[batch_indices(len(images), cfg.batch_size, cfg.seed, step)]).to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss, parts = autoencoder_loss(model, x, _step_generator(cfg.seed, step, stream=1), features)
            check_finite(loss, step, resume_path, f"Lower lr (now {cfg.lr}).")
            optimizer_step(loss, model, opt, scaler, sched, cfg.grad_clip)
            step += 1
            seen += cfg.batch_size
            if step % cfg.log_every == 0 or step == total:
                history.append((step, loss.item()))
                speed = f"{seen / (time.perf_counter() - start):.0f}"
                bar.set_postfix({k: f"{v:.4f}" for k, v in parts.items()} | {"img_s": speed})
            bar.update(1)
            if step % cfg.checkpoint_every == 0:
                write_checkpoint()
    except KeyboardInterrupt:
        interrupted = True
        print(f"interrupted at step {step}: saving {resume_path}; run again to resume")
    finally:
        bar.close()
    write_checkpoint()
    return AutoencoderTrainResult(model.eval(), step, history, out_dir, interrupted)
