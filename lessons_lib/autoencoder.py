"""A small KL-regularised autoencoder: images to a compact latent and back (Rombach et al. 2022, sec. 3 and app. G).

Latent diffusion runs the diffusion model on ``z`` instead of on pixels. The encoder maps an image to a diagonal
Gaussian q(z | x) = N(mean, exp(logvar)) over a latent of shape (latent_channels, H / f, W / f), with f = 2 per
downsampling level; the decoder maps a latent back to an image. Training minimises a reconstruction loss plus a
small KL term toward N(0, I), which keeps the latent space smooth and its scale bounded (the "KL-f4" / "KL-f8"
autoencoders of Stable Diffusion, here scaled down to 28x28 Fashion-MNIST: f = 2 gives 14x14, f = 4 gives 7x7).

After training, the latents' spread is measured once and stored as ``scale_factor`` (Stable Diffusion's 0.18215):
the diffusion model sees ``z * scale_factor``, latents of unit variance like the images in [-1, 1] it was built for.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import save
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .checkpoint import (
    AUTOENCODER,
    AUTOENCODER_WEIGHTS,
    CONFIG,
    CheckpointError,
    atomic_write_all,
    autoencoder_record,
    clean_state_dict,
    load_state,
    read_verified,
)
from .data import to_model
from .unet import ResBlock, _norm

RECONSTRUCTION_LOSSES = ("l1", "l2")


@dataclass
class AutoencoderConfig:
    """Every size of the autoencoder, its loss, and the latent scale measured after training."""

    in_channels: int = 1
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)  # one downsampling between two levels: (1, 2, 2) gives f = 4, 7x7
    num_res_blocks: int = 1
    latent_channels: int = 4
    kl_weight: float = 1e-4  # weight of the KL term against the per-pixel reconstruction loss
    reconstruction: str = "l1"
    feature_weight: float = 0.0  # weight of a feature loss in the course classifier's feature space (0: none)
    scale_factor: float | None = None  # 1 / std of the training latents, set by measure_scale_factor

    def __post_init__(self):
        self.channel_mults = tuple(self.channel_mults)
        if self.reconstruction not in RECONSTRUCTION_LOSSES:
            raise ValueError(f"unknown reconstruction loss {self.reconstruction!r}; allowed: {', '.join(RECONSTRUCTION_LOSSES)}")
        if not self.channel_mults or self.base_channels < 4 or self.latent_channels < 1 or self.num_res_blocks < 1:
            raise ValueError("need at least one level, base_channels >= 4, latent_channels >= 1 and num_res_blocks >= 1, "
                             f"got {self.channel_mults}, {self.base_channels}, {self.latent_channels}, {self.num_res_blocks}")
        for name in ("kl_weight", "feature_weight"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.scale_factor is not None and not 0 < self.scale_factor < float("inf"):
            raise ValueError(f"scale_factor must be a finite number > 0 (1 / std of the latents), got {self.scale_factor}")

    @property
    def downsampling(self) -> int:
        """f: how many image pixels one latent position covers along each side."""
        return 2 ** (len(self.channel_mults) - 1)

    def latent_shape(self, image_size: int = 28) -> tuple[int, int, int]:
        """(C, H, W) of the latent of a square image; the side must be divisible by f."""
        if image_size % self.downsampling:
            raise ValueError(f"image side {image_size} is not divisible by f = {self.downsampling} "
                             f"({len(self.channel_mults)} levels); use fewer levels or another size")
        return self.latent_channels, image_size // self.downsampling, image_size // self.downsampling

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DiagonalGaussian:
    """q(z | x) = N(mean, diag(exp(logvar))), what the encoder returns."""

    mean: torch.Tensor
    logvar: torch.Tensor

    def __post_init__(self):
        self.logvar = self.logvar.clamp(-30.0, 20.0)  # keeps exp(logvar) finite early in training

    @property
    def std(self) -> torch.Tensor:
        return (0.5 * self.logvar).exp()

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * eps, eps ~ N(0, I): the reparameterisation trick (Kingma & Welling 2014, eq. 10)."""
        device = generator.device if generator is not None else self.mean.device  # a CPU generator serves any device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype).to(self.mean.device)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per image, summed over the latent: 0.5 sum(mean^2 + var - 1 - log var)
        (Kingma & Welling 2014, app. B)."""
        return 0.5 * (self.mean.square() + self.logvar.exp() - 1 - self.logvar).flatten(1).sum(1)


class Autoencoder(nn.Module):
    """``encode(x)`` -> DiagonalGaussian over the latent, ``decode(z)`` -> image; images are (B, C, H, W) in [-1, 1]."""

    def __init__(self, config: AutoencoderConfig | None = None, **overrides):
        super().__init__()
        cfg = config or AutoencoderConfig(**overrides)
        self.config = cfg
        widths = [cfg.base_channels * m for m in cfg.channel_mults]

        encoder = [nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)]
        prev = widths[0]
        for i, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                encoder.append(ResBlock(prev, width, None, 0.0))
                prev = width
            if i < len(widths) - 1:
                encoder.append(nn.Conv2d(width, width, 3, stride=2, padding=1))  # halves the side
        head = nn.Conv2d(prev, 2 * cfg.latent_channels, 3, padding=1)  # mean and logvar
        encoder += [ResBlock(prev, prev, None, 0.0), _norm(prev), nn.SiLU(), head]
        self.encoder = nn.Sequential(*encoder)

        decoder = [nn.Conv2d(cfg.latent_channels, prev, 3, padding=1), ResBlock(prev, prev, None, 0.0)]
        for i, width in reversed(list(enumerate(widths))):
            for _ in range(cfg.num_res_blocks):
                decoder.append(ResBlock(prev, width, None, 0.0))
                prev = width
            if i > 0:
                decoder += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, width, 3, padding=1)]
        decoder += [_norm(prev), nn.SiLU(), nn.Conv2d(prev, cfg.in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*decoder)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"expected images of shape (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        for side in x.shape[-2:]:
            cfg.latent_shape(side)  # a clear error for a side the levels cannot halve
        mean, logvar = self.encoder(x).float().chunk(2, dim=1)  # fp32 under autocast: exp(logvar) and the KL need it
        return DiagonalGaussian(mean, logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"expected latents of shape (B, {self.config.latent_channels}, h, w), got {tuple(z.shape)}")
        return self.decoder(z)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """The reconstruction of x through a sampled latent, and q(z | x)."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior

    def _scale(self) -> float:
        if self.config.scale_factor is None:
            raise ValueError("this autoencoder has no scale_factor yet: measure it with measure_scale_factor(model, "
                             "training_images) after training (the trainer does this at every checkpoint)")
        return self.config.scale_factor

    def to_latent(self, x: torch.Tensor) -> torch.Tensor:
        """What the diffusion model sees of an image: the posterior's mean times scale_factor (unit variance)."""
        return self.encode(x).mode() * self._scale()

    def from_latent(self, z: torch.Tensor) -> torch.Tensor:
        """The image of a diffusion-scale latent: decode(z / scale_factor)."""
        return self.decode(z / self._scale())


def autoencoder_loss(model: Autoencoder, x: torch.Tensor, generator: torch.Generator | None = None,
                     features: nn.Module | None = None) -> tuple[torch.Tensor, dict]:
    """Reconstruction (mean per pixel, L1 or L2) + kl_weight * KL (per image, divided by its pixels)
    + feature_weight * the mean squared distance of ``features(x_hat)`` from ``features(x)``; also each part.

    ``features``: a frozen feature network (the course classifier's ``features``), needed when feature_weight > 0.
    The feature term is the perceptual loss of Stable Diffusion's autoencoders (Rombach et al. 2022, app. G), here in
    the space the course's FID is measured in."""
    cfg = model.config
    x_hat, posterior = model(x, generator)
    error = x_hat - x
    reconstruction = error.abs().mean() if cfg.reconstruction == "l1" else error.square().mean()
    kl = posterior.kl().mean() / x[0].numel()
    loss, parts = reconstruction + cfg.kl_weight * kl, {"reconstruction": reconstruction.item(), "kl": kl.item()}
    if cfg.feature_weight > 0:
        if features is None:
            raise ValueError("feature_weight > 0 needs the feature network: pass features=classifier.features")
        feature = (features(x_hat.float()) - features(x.float()).detach()).square().mean()
        loss, parts["feature"] = loss + cfg.feature_weight * feature, feature.item()
    return loss, parts


@torch.no_grad()
def measure_scale_factor(model: Autoencoder, images: torch.Tensor, batch_size: int = 500) -> float:
    """1 / std of the latents of ``images``, stored in the config (Rombach et al. 2022, sec. 4.3.2: 'rescale the
    latent space to unit standard deviation'): the diffusion model then trains on z * scale_factor. The latents are
    the posterior means, which is what :meth:`Autoencoder.to_latent` gives the diffusion model (Stable Diffusion
    samples q(z | x) instead)."""
    latents = torch.cat([model.encode(x).mode() for x in images.split(batch_size)])
    model.config.scale_factor = 1.0 / latents.std().item()
    return model.config.scale_factor


@torch.no_grad()
@torch.no_grad()
def encode_images(model: Autoencoder, images: torch.Tensor, batch_size: int = 500, progress: bool = False) -> torch.Tensor:
    """The diffusion-scale latents (:meth:`Autoencoder.to_latent`) of uint8 images (N, C, H, W), in batches."""
    device = next(model.parameters()).device
    batches = tqdm(images.split(batch_size), desc="encoding", unit="batch", disable=not progress)
    return torch.cat([model.to_latent(to_model(x.to(device))) for x in batches])


# -----------------------------------------------------------------------------------------------
# persistence: autoencoder.safetensors + the "autoencoder" section of config.json
# -----------------------------------------------------------------------------------------------
def save_autoencoder(model: Autoencoder, path: str | Path, metadata: dict | None = None) -> Path:
    """Write ``path/autoencoder.safetensors`` and ``path/config.json`` (config, scale factor, sha256), atomically."""
    path = Path(path)
    weights = save(clean_state_dict(model.state_dict()))
    config = {AUTOENCODER: autoencoder_record(model, weights), "lessons_lib_version": __version__, **(metadata or {})}
    atomic_write_all({path / AUTOENCODER_WEIGHTS: weights, path / CONFIG: (json.dumps(config, indent=2) + "\n").encode()})
    return path


def load_autoencoder(path: str | Path, device: torch.device | str = "cpu") -> Autoencoder:
    """The autoencoder saved in ``path`` (by :func:`save_autoencoder`, or beside a latent diffusion model), in eval mode."""
    config, state = read_verified(path, AUTOENCODER_WEIGHTS)
    section = config[AUTOENCODER].get("config")
    source = Path(path) / CONFIG
    if not isinstance(section, dict):
        raise CheckpointError(f"{source}: the 'autoencoder' section has no 'config'")
    known = {f.name for f in fields(AutoencoderConfig)}
    if set(section) - known:
        raise CheckpointError(f"{source}: unknown autoencoder fields {sorted(set(section) - known)}; "
                              f"allowed: {', '.join(sorted(known))}")
    try:
        model = Autoencoder(AutoencoderConfig(**section))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: invalid autoencoder config ({err})") from err
    load_state(model, state)
    return model.to(device).eval()
