"""Generation for users: a saved model folder in, images out.

``DiffusionPipeline.from_pretrained(path)`` rebuilds the network, its noise schedule and prediction
type from ``config.json``. ``generate(GenerationConfig(...))`` draws images with any sampler, classifier-free
guidance toward a class and away from a negative class, image-to-image and inpainting
(:mod:`lessons_lib.editing`); ``interpolate`` morphs between two seeds or two classes.

A latent diffusion model's folder also holds its autoencoder: the pipeline samples latents, decodes them at the end,
and encodes the input of image-to-image and inpainting first (the mask is taken to the latent grid: a latent cell is
repainted when any of its pixels is, and the kept pixels are pasted back after decoding).

Image ``i`` of a config with ``seed=s`` is drawn from its own generator seeded ``s + i`` (for x_T and
every later noise draw), so it is the same image whatever the batch size, and whatever other configs
``generate_batch`` samples beside it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .autoencoder import Autoencoder, load_autoencoder
from .checkpoint import AUTOENCODER, CheckpointError, load_pretrained, pipeline_record, save_pretrained
from .data import FASHION_MNIST_CLASSES, to_model, to_uint8
from .device import get_device, randn, sample_generators
from .editing import Inpainter, check_mask, downsample_mask, embedding_model, img2img_steps, noise_to, slerp
from .noising import PREDICTION_TYPES
from .samplers import SAMPLERS, SPACINGS, get_sampler, make_timesteps, sample
from .schedules import NoiseSchedule, get_schedule, schedule_from_record
from .unet import UNet

# Quality presets: the sampler, number of steps and timestep spacing a config leaves unset (steps capped at T).
# DPM-Solver++ 2M on Karras et al.'s noise levels (rho = 3) scored best at 10 and 20 network evaluations on the shipped
# model (benchmarks/results/quality_per_nfe.json, 1,000 images: FID 4.1 and 4.4; on trailing steps 10.5 and 6.5). The
# Karras grid is the default only for the presets' sampler and steps: at 50 evaluations it scored 7.3 against 5.8.
PRESETS = {
    "fast": ("dpmpp_2m", 10, "karras"),
    "balanced": ("dpmpp_2m", 20, "karras"),
    "high": ("ddpm", 1000, "trailing"),
}


def preset_spacing(sampler: str, steps: int, num_train_steps: int) -> str:
    """The spacing of the preset that runs ``sampler`` with ``steps`` steps (of ``num_train_steps``), else trailing:
    a spacing measured for one sampler and budget is not carried to others."""
    return next((spacing for name, n, spacing in PRESETS.values() if (name, min(n, num_train_steps)) == (sampler, steps)),
                "trailing")


IMG2IMG_STRENGTH = 0.8  # image-to-image without a mask, when no strength is given (diffusers' default)


def class_index(name_or_index: str | int, classes=FASHION_MNIST_CLASSES) -> int:
    """A class given by index or by name (case and punctuation ignored: 'sneaker', 'ankle boot', 't-shirt')."""
    if isinstance(name_or_index, int):
        if not 0 <= name_or_index < len(classes):
            raise ValueError(f"class index must lie in [0, {len(classes) - 1}], got {name_or_index}")
        return name_or_index
    key = lambda s: "".join(ch for ch in s.lower() if ch.isalnum())  # noqa: E731
    matches = [i for i, c in enumerate(classes) if key(c) == key(name_or_index) or key(c).startswith(key(name_or_index))]
    if len(matches) != 1:
        raise ValueError(f"unknown class {name_or_index!r}; allowed: {', '.join(classes)}")
    return matches[0]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class GenerationConfig:
    """What to generate. ``sampler`` and ``steps`` left None come from ``preset``.

    - ``prompt``: the class to draw, by name ("sneaker") or index; None = unconditional.
    - ``negative``: a class to steer away from; it takes the null class's place in the unconditional
      branch of classifier-free guidance, so it acts only with ``guidance_scale`` != 1.
    - ``guidance_scale``: w in uncond + w (cond - uncond) (Ho & Salimans 2022, eq. 6); 1 = no guidance.
    - ``eta``: DDIM's noise (0 = deterministic, 1 = DDPM's variance); ``ddim`` only.
    - ``spacing``: how the steps spread over the T training steps (``SPACINGS``); None = the spacing of the preset
      with this sampler and number of steps (``karras`` for dpmpp_2m with 10 or 20), else ``trailing``; always
      ``trailing`` for edits, so that a strength s starts the run near t = s T.
    - ``init_image``: (C, H, W) or (num_images, C, H, W) in [-1, 1], the input of image-to-image / inpainting.
    - ``strength``: the fraction of the steps run from the noised ``init_image`` (0 = return it unchanged,
      1 = ignore it); default 0.8 for image-to-image, 1 for inpainting.
    - ``mask``: 1 where to repaint, 0 where to keep ``init_image``; shape (H, W), (1, H, W) or broadcastable.
    - ``jump_length``, ``resample``: RePaint's resampling for coherent fills (``resample=1``: none).
    - ``sampler_options``: further keyword arguments of the sampler (e.g. ``noise_scale``, ``clip_x0``).
    """

    prompt: str | int | None = None
    negative: str | int | None = None
    num_images: int = 1
    seed: int = 0
    preset: str = "balanced"
    sampler: str | None = None
    steps: int | None = None
    guidance_scale: float = 1.0
    eta: float | None = None
    spacing: str | None = None
    device: str | None = None
    init_image: torch.Tensor | None = None
    strength: float | None = None
    mask: torch.Tensor | None = None
    jump_length: int = 10
    resample: int = 1
    sampler_options: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("num_images", "steps", "jump_length", "resample"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63 - self.num_images:
            raise ValueError(f"seed must be an int in [0, 2**63 - num_images) (image i uses seed + i), got {self.seed!r}")
        for name in ("prompt", "negative"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str) and not _is_int(value):
                raise TypeError(f"{name} must be a class name (e.g. 'sneaker'), a class index or None, "
                                f"got {type(value).__name__} {value!r}")
        for name, value, allowed in (("preset", self.preset, PRESETS), ("spacing", self.spacing, SPACINGS),
                                     ("sampler", self.sampler, SAMPLERS)):
            if value not in allowed and not (name in ("sampler", "spacing") and value is None):
                raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")
        if (isinstance(self.guidance_scale, bool) or not isinstance(self.guidance_scale, (int, float))
                or not 0 <= self.guidance_scale < math.inf):
            raise ValueError(f"guidance_scale must be a finite number >= 0 (1 = no guidance), got {self.guidance_scale!r}")
        if self.eta is not None and not 0 <= self.eta < math.inf:
            raise ValueError(f"eta must be >= 0, got {self.eta!r}")
        if self.strength is not None:
            img2img_steps(1, self.strength)  # checks 0 <= strength <= 1
        if self.init_image is None and (self.mask is not None or self.strength is not None):
            raise ValueError("mask and strength edit an image: give init_image too")


@dataclass
class GenerationResult:
    images: torch.Tensor  # (num_images, C, H, W) in [-1, 1], on the CPU
    labels: torch.Tensor | None  # the class of each image; None when no prompt was given
    config: GenerationConfig  # as run: the preset's sampler and steps filled in
    seeds: list[int]  # the seed of each image (interpolate: of the per-step noise)
    steps: int  # sampler steps run (fewer than config.steps for image-to-image)
    nfe: int  # network calls (a guided call evaluates both branches in one batch); shared by configs batched together
    seconds: float  # wall time of the run that made these images; shared by configs batched together


@dataclass
class DiffusionPipeline:
    model: UNet
    schedule: NoiseSchedule
    prediction: str = "eps"
    classes: tuple[str, ...] = FASHION_MNIST_CLASSES
    metadata: dict | None = None
    image_size: int = 28  # of the images (a latent model's latents are smaller)
    autoencoder: Autoencoder | None = None  # latent diffusion: the model samples its latents, decoded at the end

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None) -> DiffusionPipeline:
        """The pipeline saved in ``path``: network, schedule, prediction type, image size and class names.

        Folders from before the ``pipeline`` section (which the trainer and :meth:`save_pretrained` write) are
        read from their ``train`` section: Fashion-MNIST sizes and names. A folder with an ``autoencoder`` section
        (latent diffusion) loads its autoencoder too.
        """
        device = get_device(device)
        model, config = load_pretrained(path, device=device)
        file = Path(path) / "config.json"
        if "pipeline" not in config and "train" not in config:
            raise CheckpointError(f"{file} has no 'pipeline' section (nor a trainer's 'train' "
                                  "section): the schedule and prediction type are unknown. Save it with "
                                  "DiffusionPipeline.save_pretrained or the trainer.")
        section = "pipeline" if "pipeline" in config else "train"
        p = config[section]
        try:
            if section == "pipeline":
                schedule, prediction = schedule_from_record(p["schedule"]), p["prediction"]
                classes, image_size = tuple(p["classes"]), p["image_size"]
            else:
                schedule = get_schedule(p["schedule"], p["num_steps"], zero_terminal_snr=p.get("zero_terminal_snr", False))
                prediction, classes, image_size = p["prediction"], FASHION_MNIST_CLASSES, 28
        except KeyError as err:
            raise CheckpointError(f"{file}: the '{section}' section lacks {err}") from None
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{file}: the '{section}' section is not valid: {err}") from None
        if prediction not in PREDICTION_TYPES:
            raise CheckpointError(f"{file}: unknown prediction {prediction!r}; allowed: {', '.join(PREDICTION_TYPES)}")
        autoencoder = load_autoencoder(path, device) if AUTOENCODER in config else None
        if autoencoder is not None and autoencoder.config.latent_channels != model.config.in_channels:
            raise CheckpointError(f"{file}: the autoencoder's latents have {autoencoder.config.latent_channels} channels "
                                  f"but the network takes {model.config.in_channels}")
        return cls(model, schedule, prediction, classes, config, image_size, autoencoder)

    def save_pretrained(self, path: str | Path) -> Path:
        """Weights + config.json with everything :meth:`from_pretrained` needs, and this pipeline's other metadata."""
        kept = {k: v for k, v in (self.metadata or {}).items()
                if k not in ("model", "weights_sha256", "lessons_lib_version", AUTOENCODER)}
        record = pipeline_record(self.schedule, self.prediction, self.image_size, self.classes)
        return save_pretrained(self.model, path, metadata={**kept, "pipeline": record}, autoencoder=self.autoencoder)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images it makes and edits."""
        channels = self.model.config.in_channels if self.autoencoder is None else self.autoencoder.config.in_channels
        return channels, self.image_size, self.image_size

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of what the network denoises: the images, or a latent model's latents."""
        if self.autoencoder is None:
            return self.image_shape
        return self.autoencoder.config.latent_shape(self.image_size)

    def to(self, device: str | torch.device) -> DiffusionPipeline:
        self.model.to(get_device(device))
        if self.autoencoder is not None:
            self.autoencoder.to(get_device(device))
        return self

    # -----------------------------------------------------------------------------------------------
    # checking a config against this model
    # -----------------------------------------------------------------------------------------------
    def resolve(self, config: GenerationConfig) -> GenerationConfig:
        """``config`` checked against this model, with the preset's sampler, steps and spacing and the default
        strength filled in."""
        T = self.schedule.num_steps
        sampler, steps, _ = PRESETS[config.preset]
        sampler = config.sampler if config.sampler is not None else sampler
        steps = config.steps if config.steps is not None else min(steps, T)
        spacing = config.spacing or ("trailing" if config.init_image is not None else preset_spacing(sampler, steps, T))
        config = replace(config, sampler=sampler, steps=steps, spacing=spacing)
        if config.steps > T:
            raise ValueError(f"steps must lie in [1, {T}] (the model's training steps), got {config.steps}")
        conditional = self.model.config.num_classes is not None
        for name in ("prompt", "negative"):
            if getattr(config, name) is not None:
                if not conditional:
                    raise ValueError(f"this model is unconditional: {name} must be None")
                class_index(getattr(config, name), self.classes)
        if config.guidance_scale != 1 and config.prompt is None and config.negative is None:
            raise ValueError("guidance_scale != 1 needs a prompt or a negative class (there is nothing to guide toward)")
        if config.negative is not None and config.guidance_scale == 1:
            raise ValueError("a negative class acts through guidance: set guidance_scale > 1")
        if config.eta is not None and config.sampler != "ddim":
            raise ValueError(f"eta is DDIM's noise: use sampler='ddim' or leave eta unset (sampler {config.sampler!r})")
        if config.init_image is None:
            return config
        self._check_init_image(config)
        strength = config.strength if config.strength is not None else 1.0 if config.mask is not None else IMG2IMG_STRENGTH
        return replace(config, strength=strength)

    def _check_init_image(self, config: GenerationConfig) -> None:
        image, shape = config.init_image, self.image_shape
        if not isinstance(image, torch.Tensor) or image.ndim not in (3, 4) or tuple(image.shape[-3:]) != shape:
            got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"init_image must have shape {shape} or (B, *{shape}) in [-1, 1], got {got}")
        if image.ndim == 4 and len(image) not in (1, config.num_images):
            raise ValueError(f"init_image holds {len(image)} images for num_images={config.num_images}; "
                             f"give 1 or {config.num_images}")
        if not torch.isfinite(image).all() or image.min() < -1 or image.max() > 1:
            raise ValueError("init_image values must lie in [-1, 1] (use lessons_lib.data.to_model on uint8 pixels)")

    # -----------------------------------------------------------------------------------------------
    # generating
    # -----------------------------------------------------------------------------------------------
    def generate(self, config: GenerationConfig | None = None, progress: bool = True, **fields) -> GenerationResult:
        """Images for one config (or for ``GenerationConfig(**fields)``), with the time taken and the steps run."""
        if config is not None and fields:
            raise TypeError(f"give a GenerationConfig or its fields, not both (got config and {', '.join(fields)})")
        return self.generate_batch([config if config is not None else GenerationConfig(**fields)], progress)[0]

    def generate_batch(self, configs: list[GenerationConfig], progress: bool = True) -> list[GenerationResult]:
        """One result per config. Configs that differ only in prompt, negative class, seed and number of
        images are sampled together as one batch; each image is still the one its seed gives alone."""
        configs = [self.resolve(c) for c in configs]
        groups: dict[tuple, list[int]] = {}
        for k, c in enumerate(configs):
            key = ("edit", k) if c.init_image is not None else (
                c.sampler, c.steps, c.spacing, c.guidance_scale, c.eta, c.device, repr(sorted(c.sampler_options.items())))
            groups.setdefault(key, []).append(k)
        results: list[GenerationResult | None] = [None] * len(configs)
        for members in groups.values():
            for k, result in zip(members, self._generate_group([configs[k] for k in members], progress), strict=True):
                results[k] = result
        return results

    def _generate_group(self, configs: list[GenerationConfig], progress: bool) -> list[GenerationResult]:
        first = configs[0]
        if first.device is not None:
            self.to(first.device)
        generators = [g for c in configs for g in sample_generators(c.seed, c.num_images)]
        labels, null_labels = self._labels(configs)
        eps = randn((len(generators), *self.sample_shape), generator=generators, device=self.device)
        x0 = None
        if first.init_image is not None:
            x0 = first.init_image.to(self.device).expand(first.num_images, *self.image_shape)
        images, steps, nfe, seconds = self._sample(first, eps, generators, labels, null_labels, x0=x0, progress=progress)
        results, start = [], 0
        for c in configs:
            part = slice(start, start + c.num_images)
            start += c.num_images
            results.append(GenerationResult(images[part], labels[part].cpu() if c.prompt is not None else None, c,
                                            list(range(c.seed, c.seed + c.num_images)), steps, nfe, seconds))
        return results

    def _labels(self, configs: list[GenerationConfig]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Per-image class labels and labels of the unconditional branch: the null class, or the negative class."""
        null = self.model.config.num_classes
        if null is None:
            return None, None
        index = lambda name: null if name is None else class_index(name, self.classes)  # noqa: E731
        labels = [index(c.prompt) for c in configs for _ in range(c.num_images)]
        negatives = [index(c.negative) for c in configs for _ in range(c.num_images)]
        return torch.tensor(labels, device=self.device), torch.tensor(negatives, device=self.device)

    def _sample(self, c: GenerationConfig, eps: torch.Tensor, generators, labels, null_labels, x0=None, model=None,
                progress: bool = True) -> tuple[torch.Tensor, int, int, float]:
        """Run ``c``'s sampler from the noise ``eps``, or from ``x0`` noised for image-to-image / inpainting.

        Returns the images (on the CPU), the steps run, the number of network calls and the seconds taken.
        A latent model encodes ``x0`` and takes the mask to the latent grid first, and decodes at the end.
        """
        start = time.perf_counter()
        timesteps = make_timesteps(self.schedule.num_steps, c.steps, c.spacing, self.schedule.alpha_bar)
        run = img2img_steps(len(timesteps), c.strength) if x0 is not None else len(timesteps)
        if run == 0:
            return x0.cpu().clone(), 0, 0, time.perf_counter() - start
        ae, image, mask = self.autoencoder, x0, c.mask
        if ae is not None and x0 is not None:
            with torch.no_grad():
                x0 = ae.to_latent(image)
            if mask is not None:
                mask = downsample_mask(check_mask(mask, image).expand(image.shape), ae.config.downsampling)
        options = {**c.sampler_options, **({"eta": c.eta} if c.eta is not None else {})}
        if ae is not None:
            options.setdefault("clip_x0", False)  # latents are not confined to [-1, 1] as pixels are
        if run < len(timesteps):
            options["timesteps"] = timesteps[-run:]  # SDEdit: the last `run` steps, from x0 noised to their start
        sampler = get_sampler(c.sampler, self.schedule, c.steps, c.spacing, prediction=self.prediction, **options)
        x_T = eps if run == len(timesteps) else noise_to(x0, sampler.alpha_bars(0)[0], eps)
        on_step = None
        if c.mask is not None:
            on_step = Inpainter(model or self.model, sampler, x0, mask, generators, labels, c.guidance_scale,
                                null_labels, c.jump_length, c.resample)
        calls = []
        hook = self.model.register_forward_pre_hook(lambda module, args: calls.append(1))
        try:
            out = sample(model or self.model, x_T, sampler, labels, c.guidance_scale, generators, progress,
                         null_label=null_labels, on_step=on_step, clip=ae is None)
        finally:
            hook.remove()
        images = out.images
        if ae is not None:
            with torch.no_grad():
                images = ae.from_latent(images).clamp(-1, 1)
            if c.mask is not None:
                images = torch.where(check_mask(c.mask, image), images, image)  # the kept pixels exactly, not re-decoded
        return images.cpu(), run, len(calls), time.perf_counter() - start

    def interpolate(self, config: GenerationConfig, frames: int, to_seed: int | None = None,
                    to_class: str | int | None = None, progress: bool = True) -> GenerationResult:
        """``frames`` images morphing from ``config`` to ``to_seed`` (slerp between the two x_T) or to
        ``to_class`` (slerp between the two class embeddings, same x_T).

        Every frame takes its per-step noise from ``config.seed``, so ancestral samplers morph smoothly
        too; the first frame is ``generate(config)``'s first image, and with a deterministic sampler the
        last is the image of ``to_seed`` / ``to_class``.
        """
        if not _is_int(frames) or frames < 2:
            raise ValueError(f"frames must be an int >= 2, got {frames!r}")
        if (to_seed is None) == (to_class is None):
            raise ValueError("give exactly one of to_seed (morph between two noises) and to_class (between two classes)")
        if to_seed is not None and not _is_int(to_seed):
            raise ValueError(f"to_seed must be an int, got {to_seed!r}")
        if config.init_image is not None:
            raise ValueError("interpolation starts from noise: init_image, strength and mask are not supported")
        if to_class is not None and self.model.config.num_classes is None:
            raise ValueError("this model is unconditional: to_class needs a class-conditional model")
        if to_class is not None and config.prompt is None:
            raise ValueError("to_class morphs from config.prompt: give a prompt too")
        c = self.resolve(replace(config, num_images=frames))
        weights = torch.linspace(0, 1, frames, dtype=torch.float64)
        generators = sample_generators([c.seed] * frames, frames)
        x_a = randn((frames, *self.sample_shape), generator=generators, device=self.device)  # the same noise in every row
        labels, null_labels = self._labels([c])
        model = None
        if to_seed is not None:
            x_b = randn((1, *self.sample_shape), seed=to_seed, device=self.device)[0]
            x_T = slerp(x_a[0], x_b, weights)
        else:
            table = self.model.class_emb.weight.detach()
            blends = slerp(table[labels[0]], table[class_index(to_class, self.classes)], weights)
            model = embedding_model(self.model, torch.cat([blends, table[null_labels[:1]]]))  # last row: unconditional branch
            x_T, labels, null_labels = x_a, torch.arange(frames, device=self.device), frames
        images, steps, nfe, seconds = self._sample(c, x_T, generators, labels, null_labels, model=model, progress=progress)
        labels = labels.cpu() if to_seed is not None and c.prompt is not None else None  # a blend of classes has no label
        return GenerationResult(images, labels, c, [c.seed] * frames, steps, nfe, seconds)

    def __call__(self, n: int = 16, class_label: str | int | None = None, steps: int = 50, sampler: str = "ddim",
                 seed: int = 0, guidance_scale: float = 1.0, progress: bool = True, **sampler_options):
        """``n`` images (B, C, H, W) in [-1, 1] and their labels (or None without a class): a short form of :meth:`generate`."""
        result = self.generate(GenerationConfig(prompt=class_label, num_images=n, steps=steps, sampler=sampler, seed=seed,
                                                guidance_scale=guidance_scale, sampler_options=sampler_options), progress)
        return result.images, result.labels


def load_image(path: str | Path, shape: tuple[int, int, int] = (1, 28, 28), mask: bool = False) -> torch.Tensor:
    """An image file as a (C, H, W) tensor in [-1, 1], converted (grey / RGB) and resized to ``shape``.

    ``mask=True``: a (1, H, W) bool tensor, True where the pixel is light (>= 128): the region to repaint.
    """
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.functional import pil_to_tensor

    channels, h, w = shape
    if channels not in (1, 3):
        raise ValueError(f"images have 1 (grey) or 3 (RGB) channels, got {channels}")
    try:
        with Image.open(path) as img:
            if img.mode.startswith("I"):  # 16-bit grey (PNG "I;16" / "I"): scale 0-65535 to 0-255, do not clip to white
                img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257).clip(0, 255).round().astype(np.uint8))
            img = img.convert("L" if mask or channels == 1 else "RGB")
            if img.size != (w, h):
                img = img.resize((w, h), Image.Resampling.NEAREST if mask else Image.Resampling.BILINEAR)
            pixels = pil_to_tensor(img)
    except FileNotFoundError as err:
        raise ValueError(f"{path}: no such file") from err
    except UnidentifiedImageError as err:
        raise ValueError(f"{path} is not an image Pillow can read (PNG, JPEG, ...)") from err
    return pixels >= 128 if mask else to_model(pixels)


def check_mask_fits(image_path: str | Path, mask_path: str | Path) -> None:
    """A mask file must have its image's size: both are resized to the model's together, so a mask of another
    size would cover another part of the picture after resizing."""
    from PIL import Image, UnidentifiedImageError

    sizes = []
    for path in (image_path, mask_path):
        try:
            with Image.open(path) as img:
                sizes.append(img.size)
        except (FileNotFoundError, UnidentifiedImageError):
            return  # load_image says what is wrong with the file
    if sizes[0] != sizes[1]:
        (w, h), (mw, mh) = sizes
        raise ValueError(f"the mask {mask_path} is {mw}x{mh} but the image {image_path} is {w}x{h}: "
                         "give a mask of the image's size (white = repaint, black = keep)")


def save_image(image: torch.Tensor, path: str | Path) -> Path:
    """One (C, H, W) image in [-1, 1] as an 8-bit PNG (or any format Pillow infers from the name), pixel for pixel."""
    from PIL import Image

    pixels = to_uint8(image).cpu()
    if pixels.ndim != 3 or pixels.shape[0] not in (1, 3):
        raise ValueError(f"expected one image (1 or 3, H, W), got shape {tuple(image.shape)}")
    array = pixels[0].numpy() if pixels.shape[0] == 1 else pixels.permute(1, 2, 0).numpy()
    Image.fromarray(array).save(path)
    return Path(path)
