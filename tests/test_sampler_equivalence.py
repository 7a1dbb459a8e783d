"""Our samplers against the schedulers of diffusers, the reference implementation: same model, same x_T,
same configuration (schedule, spacing, steps, prediction type), the same noise for the ancestral ones.

The model is the exact denoiser of a two-valued toy distribution: nonlinear in x_t, cheap, and its x0
leaves [-1, 1], so that clipping and thresholding matter. Samplers must agree to 1e-4 relative error;
ancestral ones get the same noise sequence on both sides (their noise functions are patched). diffusers
keeps alpha_bar in float32, which at alpha_bar ~ 2e-7 (cosine, t = T - 1) moves x0 = (x - sqrt(1 - ab) eps)
/ sqrt(ab) by ~1e-4 on its own: we hand it our float64 alpha_bar (test_schedules_are_diffusers_schedules
checks they are the same schedule). Its sigma-space schedulers also round their sigmas (and Euler its x)
to float32; there the tolerance grows by 8 * 2^-24 * sigma_max.

Deliberate differences, each covered where the two agree and checked another way where they do not:
- diffusers' DDIM and PNDM step from t to t - T // n, not to the next timestep of the list; they agree on
  evenly spaced grids (leading; trailing when n divides T; linspace when n is 1 or T). Elsewhere we check
  DDIM against diffusers' DPM-Solver++ of order 1, which is DDIM on any list of timesteps.
- diffusers' trailing spacing builds np.arange(T, 0, -T / n) in floating point: for some n it rounds a
  *.5 timestep the other way, or yields n + 1 timesteps ending at the out-of-range -1 (e.g. T = 100,
  n = 29). Ours is round(T - k T / n) - 1, k < n. Its linspace for Euler and Heun keeps fractional
  timesteps (interpolated sigmas); ours rounds them like every other sampler, so the model always gets
  integer t. Its DPM-Solver++ leading/linspace spacings take n of n + 1 points. Where a scheduler accepts
  a list of timesteps, we hand it ours instead; Euler ancestral has no such option and is checked through
  DDPM (the same step with the same noise); PNDM has none either and is compared on the grids it shares.
- diffusers' PNDM needs n >= 4 steps for its Runge-Kutta warm-up, and when T // n is odd it evaluates the
  model at the midpoint t' + T // n // 2 but moves x to t - T // n // 2; ours uses t - (t - t') // 2 for both.
  It also combines raw v-predictions made at different timesteps; ours converts each output to eps where it
  was made (the prediction type does not change our samples: tests/test_samplers.py). So PNDM is compared
  with eps models, n >= 4 and T // n even (PLMS: any n) on the grids diffusers walks.
- diffusers' DDPM with fixed_large variance adds noise on the final image when the last timestep is not
  0 (trailing); ours returns the mean at the last step (Ho et al. 2020, Algorithm 2: z = 0 at t = 1).
- Sigma-space schedulers start from x_T * init_noise_sigma, with init_noise_sigma = sigma_max for
  linspace and trailing; the x that corresponds to unit x_T is x_T * sqrt(1 + sigma_max^2), which we
  hand them.
- From above SIGMA_MAX (sigma ~ 2e4 at t = T - 1 of the cosine schedule) our Heun, PNDM and PLMS take the first
  step first order (lessons_lib.samplers.Sampler._starts_in_pure_noise), where diffusers' corrections blow up
  (tests/test_samplers.py::test_higher_order_solvers_beat_euler measures both). There the reference is our DDIM
  step to t_1, then the diffusers scheduler on t_1, ..., t_{n-1}.
- diffusers' DDIM uses the unclipped eps after clipping x0 unless use_clipped_model_output=True; ours
  re-derives eps from the clipped x0 (as DDPM's mean does), which is that option.
"""

import itertools

import pytest
import torch

from lessons_lib import samplers
from lessons_lib.noising import convert_prediction
from lessons_lib.samplers import SAMPLERS, SPACINGS, get_sampler, make_timesteps, sample
from lessons_lib.schedules import get_schedule

diffusers = pytest.importorskip("diffusers")
from diffusers.schedulers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    scheduling_ddim,
    scheduling_ddpm,
    scheduling_euler_ancestral_discrete,
)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

BETAS = {  # our schedule: diffusers' beta_schedule and the betas it is given
    "linear": {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "cosine": {"beta_schedule": "squaredcos_cap_v2"},
}
PREDICTIONS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
SUPPORTED = {  # prediction types the diffusers scheduler takes (see the module docstring for PNDM's v)
    "euler_ancestral": ("eps", "v"), "pndm": ("eps",), "plms": ("eps",),
}
NOISE = {  # where each ancestral diffusers scheduler draws its noise
    "ddpm": scheduling_ddpm, "ddim": scheduling_ddim, "euler_ancestral": scheduling_euler_ancestral_discrete,
}
T = 50
COUNTS = (1, 5, 7, 10, 29, T)  # one step, divisors of T, primes, all steps
SHAPE = (2, 1, 4, 4)


def schedule(name: str, num_steps: int = T):
    return get_schedule(name, num_steps)


def mixture_model(schedule, prediction: str):
    """The exact E[x0 | x_t] for pixels that take one of two values with equal odds, returned as ``prediction``."""
    low, high = torch.linspace(-1.5, -0.2, 16).double().view(1, 1, 4, 4), torch.linspace(0.1, 1.4, 16).double().view(1, 1, 4, 4)

    def model(x, t, labels=None):
        t = torch.as_tensor(t).expand(len(x))  # diffusers passes one timestep (a float for Euler and Heun)
        assert torch.all(t == t.round()), f"only integer timesteps are compared, got {t}"
        t = t.long()
        ab = schedule.alpha_bar[t].view(-1, 1, 1, 1)
        log_odds = ((x - ab.sqrt() * low) ** 2 - (x - ab.sqrt() * high) ** 2) / (2 * (1 - ab))  # of N(x_t; sqrt(ab) c, 1 - ab)
        x0 = low + (high - low) * torch.sigmoid(log_odds)  # the posterior mean
        return convert_prediction(x0, "x0", prediction, x, t, schedule)

    return model


def x_T(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class NoiseQueue:
    """One fixed sequence of standard normal draws, replayed to each side in the order it asks."""

    def __init__(self, count: int, seed: int = 1):
        gen = torch.Generator().manual_seed(seed)
        self.noise = [torch.randn(SHAPE, generator=gen, dtype=torch.float64) for _ in range(count)]

    def source(self):
        draws = iter(self.noise)

        def draw(shape, *args, **kwargs):
            z = next(draws)
            assert tuple(shape) == z.shape
            return z

        return draw


def uniform_walk(ts: torch.Tensor, num_train_steps: int, n: int) -> bool:
    """Does diffusers' rule "step from t to t - T // n" visit exactly our timesteps, then the clean image?"""
    h = num_train_steps // n
    return bool(torch.all(ts[:-1] - ts[1:] == h)) and int(ts[-1]) < h


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref.to(ours.dtype)).norm() / ref.norm()).item()


def run_ours(sampler, model, x):
    """The final x, unclipped (sample() clips its images to [-1, 1])."""
    return sample(model, x, sampler, progress=False, return_trajectory=True).trajectory[-1]


def run_reference(scheduler, model, x, **step_kwargs):
    """The loop of diffusers' pipelines: scale the input, call the model, step."""
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x


def exact(scheduler, schedule):
    """``scheduler`` with our float64 alpha_bar in place of its float32 copy of the same schedule."""
    scheduler.alphas_cumprod = schedule.alpha_bar.clone()
    return scheduler


def set_walk(scheduler, walk: torch.Tensor, timesteps: torch.Tensor) -> None:
    """Timesteps from the config's spacing; where they differ from ours (see the module docstring), ours."""
    scheduler.set_timesteps(len(walk))
    if not torch.equal(scheduler.timesteps.double(), timesteps.double()):
        scheduler.set_timesteps(timesteps=walk.tolist())
    assert torch.equal(scheduler.timesteps.double(), timesteps.double())


def reference_walk(sampler) -> tuple[torch.Tensor, int]:
    """The grid the diffusers scheduler walks and how many of our evaluations come before it: all of ours, or,
    where our Heun / PNDM / PLMS step out of pure noise first order, the grid after that step."""
    if sampler.name in ("heun", "pndm", "plms") and sampler._starts_in_pure_noise(sampler.grid):
        return sampler.grid[1:], 1
    return sampler.grid, 0


def x0_options(scheduler_cls, clip_x0: bool, threshold: float | None, threshold_max: float | None) -> dict:
    """diffusers' names for our x0 clipping / dynamic thresholding (for schedulers that have them)."""
    if scheduler_cls is DPMSolverMultistepScheduler:  # no clip_sample: thresholding with s capped at 1 is clipping
        return {"thresholding": clip_x0 or threshold is not None, "dynamic_thresholding_ratio": threshold or 0.995,
                "sample_max_value": (threshold_max or float("inf")) if threshold is not None else 1.0}
    if scheduler_cls is HeunDiscreteScheduler:
        return {"clip_sample": clip_x0}
    return {"clip_sample": clip_x0, "thresholding": threshold is not None, "dynamic_thresholding_ratio": threshold or 0.995,
            "sample_max_value": threshold_max or float("inf")}


def check(name: str, schedule_name: str, num_train_steps: int, spacing: str, n: int, prediction: str, monkeypatch,
          clip_x0: bool | None = None, dynamic_threshold: float | None = None, threshold_max: float | None = None,
          **options) -> None:
    """Run ``name`` and its diffusers counterpart on the same configuration; assert they agree."""
    s = schedule(schedule_name, num_train_steps)
    model = mixture_model(s, prediction)
    ref_clip = {"ddim": True, "ddpm": True, "heun": True, "dpmpp_2m": True}.get(name, False)  # diffusers has it
    clip_x0 = ref_clip if clip_x0 is None else clip_x0
    sampler = get_sampler(name, s, n, spacing, prediction=prediction, clip_x0=clip_x0,
                          dynamic_threshold=dynamic_threshold, threshold_max=threshold_max, **options)
    config = {"num_train_timesteps": num_train_steps, **BETAS[schedule_name], "prediction_type": PREDICTIONS[prediction],
              "timestep_spacing": spacing if spacing != "karras" else "trailing"}  # karras: our list is passed
    x0_opts = lambda cls: x0_options(cls, clip_x0, dynamic_threshold, threshold_max)  # noqa: E731
    step_kwargs, x_start, correction = {}, x_T(), 0.0
    walk, skipped = reference_walk(sampler)
    if skipped:  # our first step is DDIM's (module docstring): the reference starts where it lands
        ddim = get_sampler("ddim", s, timesteps=sampler.grid.tolist(), prediction=prediction, clip_x0=clip_x0)
        x_start = sample(model, x_T(), ddim, progress=False, return_trajectory=True).trajectory[1]
    noise = NoiseQueue(sampler.nfe + 1)
    if name in NOISE:
        monkeypatch.setattr(samplers, "randn", noise.source())

    if name == "ddim":
        ref = exact(DDIMScheduler(**config, **x0_opts(DDIMScheduler)), s)
        ref.set_timesteps(n)
        step_kwargs = {"eta": options.get("eta", 0.0), "use_clipped_model_output": True}
        monkeypatch.setattr(scheduling_ddim, "randn_tensor", noise.source())
        if not (torch.equal(ref.timesteps, sampler.timesteps) and uniform_walk(sampler.grid, num_train_steps, n)):
            # diffusers' DDIM would walk another grid; DDIM is first-order DPM-Solver++ (Lu et al. 2022), which
            # takes our list. Only the deterministic DDIM has this second reference.
            assert options.get("eta", 0.0) == 0, "ancestral DDIM is compared on the grids diffusers shares"
            cls = DPMSolverMultistepScheduler
            ref = exact(cls(**config, solver_order=1, **x0_opts(cls)), s)
            ref.set_timesteps(timesteps=sampler.grid.tolist())
            step_kwargs = {}
    elif name == "ddpm":
        ref = exact(DDPMScheduler(**config, variance_type=options.get("variance", "fixed_small"), **x0_opts(DDPMScheduler)), s)
        set_walk(ref, walk, sampler.timesteps)
        monkeypatch.setattr(scheduling_ddpm, "randn_tensor", noise.source())
        if int(sampler.grid[-1]) > 0 and options.get("variance") == "fixed_large":
            # diffusers adds noise to the final image here (its rule is "t > 0"); we return the mean
            correction = (1 - s.alpha_bar[sampler.grid[-1]]) ** 0.5 * noise.noise[n - 1]
    elif name in ("euler", "heun"):
        cls = EulerDiscreteScheduler if name == "euler" else HeunDiscreteScheduler
        ref = exact(cls(**config, **({} if name == "euler" else x0_opts(cls))), s)
        set_walk(ref, walk, sampler.timesteps[skipped:])
        x_start = x_start * (1 + ref.sigmas[0].double() ** 2) ** 0.5
    elif name == "euler_ancestral":
        ref = exact(EulerAncestralDiscreteScheduler(**config), s)
        ref.set_timesteps(n)
        monkeypatch.setattr(scheduling_euler_ancestral_discrete, "randn_tensor", noise.source())
        x_start = x_start * (1 + ref.sigmas[0].double() ** 2) ** 0.5
        if not torch.equal(ref.timesteps.double(), sampler.timesteps.double()):
            # no list of timesteps for this scheduler: Euler ancestral is DDPM's posterior step (fixed_small)
            # written in sigma, and diffusers' DDPM takes our list
            ref = exact(DDPMScheduler(**config, clip_sample=False), s)
            ref.set_timesteps(timesteps=sampler.grid.tolist())
            monkeypatch.setattr(scheduling_ddpm, "randn_tensor", noise.source())
            x_start = x_T()
    elif name == "dpmpp_2m":
        ref = exact(DPMSolverMultistepScheduler(**config, **x0_opts(DPMSolverMultistepScheduler)), s)
        set_walk(ref, walk, sampler.timesteps)
    else:  # pndm, plms: compared on the grids diffusers walks too
        ref = exact(PNDMScheduler(**config, skip_prk_steps=name == "plms", set_alpha_to_one=True), s)
        ref.set_timesteps(len(walk))
        assert uniform_walk(walk, num_train_steps, len(walk)) and torch.equal(ref.timesteps, sampler.timesteps[skipped:])

    ours = run_ours(sampler, model, x_T())
    reference = run_reference(ref, model, x_start, **step_kwargs) - correction
    # diffusers keeps its sigmas (and Euler its x) in float32: x / sqrt(alpha_bar) ~ sigma_max x is off by a few
    # 2^-24 sigma_max, which the first x0 estimate keeps (sigma_max ~ 2000 for cosine at t = T - 1)
    sigma_max = ((1 - s.alpha_bar[walk[0]]) / s.alpha_bar[walk[0]]).sqrt().item()
    assert relative_error(ours, reference) < 1e-4 + (8 * 2**-24 * sigma_max if hasattr(ref, "sigmas") else 0)


def pndm_shares_grid(name: str, schedule_name: str, spacing: str, n: int) -> bool:
    """PNDM/PLMS configurations diffusers runs on our grid (its Runge-Kutta warm-up needs n >= 4)."""
    if spacing == "karras":
        return False  # uneven steps: PNDM and PLMS refuse them
    walk, _ = reference_walk(get_sampler(name, schedule(schedule_name), n, spacing))
    m = len(walk)  # diffusers builds its grid of m steps from the spacing: it must be the walk
    warm_up_fits = name == "plms" or (m >= 4 and T // m % 2 == 0)
    return torch.equal(make_timesteps(T, m, spacing), walk) and uniform_walk(walk, T, m) and warm_up_fits


def grid():
    """Every sampler x schedule x spacing x step count, the prediction type rotating along: each of a sampler's
    prediction types meets every schedule, every spacing and every step count."""
    for name in SAMPLERS:
        predictions = SUPPORTED.get(name, tuple(PREDICTIONS))
        for (i, schedule_name), (j, spacing), (k, n) in itertools.product(*map(enumerate, (BETAS, SPACINGS, COUNTS))):
            if name in ("pndm", "plms") and not pndm_shares_grid(name, schedule_name, spacing, n):
                continue
            yield pytest.param(name, schedule_name, spacing, n, predictions[(i + j + k) % len(predictions)],
                               id=f"{name}-{schedule_name}-{spacing}-{n}")


@pytest.mark.parametrize("name, schedule_name, spacing, n, prediction", list(grid()))
def test_matches_diffusers(name, schedule_name, spacing, n, prediction, monkeypatch):
    check(name, schedule_name, T, spacing, n, prediction, monkeypatch)


@pytest.mark.parametrize("name, prediction", [(name, p) for name in SAMPLERS for p in SUPPORTED.get(name, PREDICTIONS)])
def test_every_prediction_type_matches_diffusers(name, prediction, monkeypatch):
    check(name, "cosine", T, "leading", 5, prediction, monkeypatch)


@pytest.mark.parametrize("name, options", [
    ("ddpm", {"variance": "fixed_large"}),
    ("ddim", {"eta": 0.5}),
    ("ddim", {"eta": 1.0, "clip_x0": False}),
    ("ddpm", {"clip_x0": False}),
    ("heun", {"clip_x0": False}),
    ("dpmpp_2m", {"clip_x0": False}),
    ("ddim", {"dynamic_threshold": 0.9}),
    ("ddpm", {"dynamic_threshold": 0.8, "threshold_max": 1.2}),
    ("dpmpp_2m", {"dynamic_threshold": 0.9, "threshold_max": 1.3}),
])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_options_match_diffusers(name, options, spacing, monkeypatch):
    ancestral_ddim = options.get("eta") is not None
    n = T if ancestral_ddim and spacing in ("linspace", "karras") else 10  # ancestral DDIM: a grid diffusers walks
    check(name, "linear", T, spacing, n, "eps", monkeypatch, **options)


AT_1000 = [("linear", "leading", 50, "eps"), ("scaled_linear", "trailing", 40, "v"), ("cosine", "linspace", 37, "eps")]
AT_1000_PNDM = [("linear", "leading", 50, "eps"), ("scaled_linear", "trailing", 20, "eps"), ("cosine", "leading", 25, "eps")]


@pytest.mark.parametrize("name, schedule_name, spacing, n, prediction",
                         [(name, *c) for name in SAMPLERS for c in (AT_1000_PNDM if name in ("pndm", "plms") else AT_1000)])
def test_matches_diffusers_at_1000_steps(name, schedule_name, spacing, n, prediction, monkeypatch):
    check(name, schedule_name, 1000, spacing, n, prediction, monkeypatch)


@pytest.mark.parametrize("schedule_name", BETAS)
def test_schedules_are_diffusers_schedules(schedule_name):
    ref = DDPMScheduler(num_train_timesteps=1000, **BETAS[schedule_name])
    torch.testing.assert_close(schedule(schedule_name, 1000).betas, ref.betas.double(), rtol=1e-6, atol=0)


def test_the_documented_reference_quirks_still_hold():
    """If diffusers changes these, the module docstring (and the fallbacks above) should be revisited."""
    ddim = DDIMScheduler(num_train_timesteps=100, timestep_spacing="trailing")
    ddim.set_timesteps(29)
    assert len(ddim.timesteps) == 30 and int(ddim.timesteps[-1]) == -1  # n + 1 timesteps, the last out of range
    ddim.set_timesteps(24)
    assert not torch.equal(ddim.timesteps, make_timesteps(100, 24, "trailing"))  # a *.5 rounded the other way
    euler = EulerDiscreteScheduler(num_train_timesteps=100, timestep_spacing="linspace")
    euler.set_timesteps(7)
    assert not torch.equal(euler.timesteps, euler.timesteps.round())  # fractional timesteps
    dpm = DPMSolverMultistepScheduler(num_train_timesteps=100, timestep_spacing="leading")
    dpm.set_timesteps(10)
    assert dpm.timesteps.tolist() == list(range(90, 0, -9))  # n of n + 1 points T // (n + 1) apart
    pndm = PNDMScheduler(num_train_timesteps=100)
    pndm.set_timesteps(33)  # T // n = 3: the Runge-Kutta midpoint is evaluated at 93 + 1, but x is moved to 96 - 1
    assert pndm.timesteps[:4].tolist() == [96, 94, 94, 93]
    with pytest.raises(ValueError):  # the Runge-Kutta warm-up needs 4 timesteps
        pndm.set_timesteps(3)
