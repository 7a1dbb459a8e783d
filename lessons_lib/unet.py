"""The network: a U-Net that looks at a noisy image x_t and the step t and predicts eps (or v, or x0).

Two variants, configured by :class:`UNetConfig`:

- ``attention`` (default): the DDPM / improved-DDPM design — sinusoidal time embedding and an MLP,
  residual blocks (GroupNorm, SiLU, dropout, time added in every block), multi-head self-attention at
  the low resolutions and in the middle, skip connections between the down and up paths, and optional
  class conditioning with a learned "null" class for classifier-free guidance.
- ``simple``: plain conv blocks with BatchNorm and the time embedding added per block, no attention:
  the smallest thing that works, to compare against in lesson 03.

Odd feature maps are fine (28 -> 14 -> 7 -> 4 -> 7 ...): the up path resizes to the matching skip.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = ("attention", "simple")


@dataclass
class UNetConfig:
    """Every size of the network. ``num_classes=None`` is unconditional; an int adds a null class for CFG."""

    in_channels: int = 1
    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_levels: tuple[bool, ...] = (False, False, True)  # per resolution level, lowest last
    num_heads: int = 4
    dropout: float = 0.1
    num_classes: int | None = None
    variant: str = "attention"
    extra: dict = field(default_factory=dict)  # free-form notes carried into saved configs

    def __post_init__(self):
        self.channel_mults, self.attention_levels = tuple(self.channel_mults), tuple(self.attention_levels)
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; allowed: {', '.join(VARIANTS)}")
        if len(self.attention_levels) != len(self.channel_mults):
            raise ValueError(f"attention_levels has {len(self.attention_levels)} entries for "
                             f"{len(self.channel_mults)} levels (channel_mults); give one per level")
        if self.base_channels < 2 or self.base_channels % 2:
            raise ValueError("base_channels must be even and >= 2 (it is also the time-embedding width), "
                             f"got {self.base_channels}")
        widths = [self.base_channels * m for m in self.channel_mults]
        if any(w % self.num_heads for w in widths) and self.variant == "attention":
            raise ValueError(f"every width {widths} must be divisible by num_heads={self.num_heads}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be None or >= 1, got {self.num_classes}")

    @property
    def min_size(self) -> int:
        """The smallest image side the network accepts: one pixel at the lowest level."""
        return 2 ** (len(self.channel_mults) - 1)

    def to_dict(self) -> dict:
        return asdict(self)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of the step (Vaswani et al. 2017, sec. 3.5; DDPM appendix B): [cos(t w_i), sin(t w_i)]."""
    if dim % 2:
        raise ValueError(f"the embedding width must be even (cos and sin halves), got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of at least 4 channels: with one channel per group it would be an
    instance norm, and the per-channel time shift added just before it would be normalised away."""
    groups = math.gcd(32, channels)
    while groups > 1 and channels // groups < 4:
        groups //= 2
    return nn.GroupNorm(groups, channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, add the (time + class) embedding, GroupNorm-SiLU-dropout-conv, plus a skip.

    ``emb_dim=None`` builds the block without an embedding (the autoencoder's blocks see no time step)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int | None, dropout: float):
        super().__init__()
        self.block1 = nn.Sequential(_norm(in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_ch)) if emb_dim else None
        self.block2 = nn.Sequential(_norm(out_ch), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.block1(x)
        if self.emb is not None:
            h = h + self.emb(emb)[:, :, None, None]
        return self.skip(x) + self.block2(h)


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map, with a residual connection."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w).unbind(1)
        q, k, v = (z.transpose(-1, -2) for z in (q, k, v))  # (B, heads, positions, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(Q K^T / sqrt(d)) V (Vaswani et al. 2017, eq. 1)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class SimpleBlock(nn.Module):
    """The ``simple`` variant's block: (conv-BatchNorm-ReLU) x 2 with the time embedding added in between."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.BatchNorm2d(out_ch), nn.ReLU())
        self.emb = nn.Linear(emb_dim, out_ch)
        self.conv2 = nn.Sequential(nn.Conv2d(out_ch, out_ch, 3, padding=1), nn.BatchNorm2d(out_ch), nn.ReLU(),
                                   nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x) + self.emb(emb)[:, :, None, None])


class Level(nn.Module):
    """The blocks of one resolution level (and attention after each block where enabled).

    A container, not a layer: ``UNet.forward`` walks ``blocks`` and ``attns`` itself, because the down path
    keeps every block's output for a skip and the up path concatenates one skip before every block. Hook
    the blocks, not the level, to watch shapes.
    """

    def __init__(self, channels_in: list[int], out_ch: int, emb_dim: int, cfg: UNetConfig, attention: bool):
        super().__init__()
        block = ResBlock if cfg.variant == "attention" else SimpleBlock
        self.blocks = nn.ModuleList(block(c, out_ch, emb_dim, cfg.dropout) for c in channels_in)
        self.attns = nn.ModuleList(Attention(out_ch, cfg.num_heads) if attention else nn.Identity() for _ in channels_in)


class UNet(nn.Module):
    """``model(x_t, t, class_labels=None, class_embedding=None)`` -> prediction with the shape of ``x_t``."""

    def __init__(self, config: UNetConfig | None = None, **overrides):
        super().__init__()
        cfg = config or UNetConfig(**overrides)
        self.config = cfg
        ch = cfg.base_channels
        emb_dim = 4 * ch
        attention = [a and cfg.variant == "attention" for a in cfg.attention_levels]
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # index num_classes is the learned "null" class: the unconditional branch of classifier-free guidance
        self.class_emb = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes else None
        self.stem = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        widths = [ch * m for m in cfg.channel_mults]
        skips, prev = [ch], ch
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        for i, width in enumerate(widths):
            ins = [prev] + [width] * (cfg.num_res_blocks - 1)
            self.down.append(Level(ins, width, emb_dim, cfg, attention[i]))
            skips += [width] * cfg.num_res_blocks
            prev = width
            last = i == len(widths) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(width, width, 3, stride=2, padding=1))
            if not last:
                skips.append(width)
        self.mid = Level([prev, prev], prev, emb_dim, cfg, attention=cfg.variant == "attention")

        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, width in reversed(list(enumerate(widths))):
            ins = [prev + skips.pop()] + [width + skips.pop() for _ in range(cfg.num_res_blocks)]
            self.up.append(Level(ins, width, emb_dim, cfg, attention[i]))
            prev = width
            self.upsample.append(nn.Conv2d(width, width, 3, padding=1) if i > 0 else nn.Identity())
        norm = _norm(prev) if cfg.variant == "attention" else nn.BatchNorm2d(prev)
        self.head = nn.Sequential(norm, nn.SiLU(), nn.Conv2d(prev, cfg.in_channels, 3, padding=1))

    def _embedding(self, t: torch.Tensor, class_labels: torch.Tensor | None, batch: int,
                   class_embedding: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.as_tensor(t, device=self.stem.weight.device)
        t = t.expand(batch) if t.ndim == 0 else t
        emb = self.time_mlp(timestep_embedding(t, self.config.base_channels).to(self.stem.weight.dtype))
        if class_embedding is not None:
            return emb + self._check_class_embedding(class_embedding, class_labels, tuple(emb.shape)).to(emb)
        if self.class_emb is not None:
            if class_labels is None:
                class_labels = torch.full((batch,), self.config.num_classes, device=emb.device)
            elif class_labels.min() < 0 or class_labels.max() > self.config.num_classes:
                n = self.config.num_classes
                raise ValueError(f"class labels must lie in [0, {n}] ({n} = null class), "
                                 f"got [{int(class_labels.min())}, {int(class_labels.max())}]")
            emb = emb + self.class_emb(class_labels.to(emb.device))
        elif class_labels is not None:
            raise ValueError("this model is unconditional (num_classes=None): pass class_labels=None")
        return emb

    def _check_class_embedding(self, class_embedding: torch.Tensor, class_labels: torch.Tensor | None,
                               shape: tuple[int, int]) -> torch.Tensor:
        if self.class_emb is None:
            raise ValueError("this model is unconditional (num_classes=None): pass class_embedding=None")
        if class_labels is not None:
            raise ValueError("give class_labels or class_embedding, not both")
        if tuple(class_embedding.shape) != shape:
            raise ValueError(f"class_embedding must have shape (B, D) = {shape} (rows of model.class_emb), "
                             f"got {tuple(class_embedding.shape)}")
        return class_embedding

    def _check_input(self, x: torch.Tensor) -> None:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"expected x of shape (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        if min(x.shape[-2:]) < cfg.min_size:
            raise ValueError(f"images must be at least {cfg.min_size}x{cfg.min_size} for {len(cfg.channel_mults)} "
                             f"levels, got {tuple(x.shape[-2:])}")

    def forward(self, x: torch.Tensor, t: torch.Tensor | int, class_labels: torch.Tensor | None = None,
                class_embedding: torch.Tensor | None = None) -> torch.Tensor:
        """``class_embedding`` (B, D), e.g. a blend of rows of ``class_emb``, replaces the label lookup (interpolation)."""
        self._check_input(x)
        emb = self._embedding(t, class_labels, x.shape[0], class_embedding)
        h = self.stem(x)
        skips = [h]
        for level, down in zip(self.down, self.downsample, strict=True):
            for block, attn in zip(level.blocks, level.attns, strict=True):
                h = attn(block(h, emb))
                skips.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)
                skips.append(h)
        for block, attn in zip(self.mid.blocks, self.mid.attns, strict=True):
            h = attn(block(h, emb))
        for level, up in zip(self.up, self.upsample, strict=True):
            for block, attn in zip(level.blocks, level.attns, strict=True):
                h = attn(block(torch.cat([h, skips.pop()], dim=1), emb))
            if not isinstance(up, nn.Identity):
                h = up(F.interpolate(h, size=skips[-1].shape[-2:], mode="nearest"))  # back to the skip's size, odd or even
        return self.head(h)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
