"""Training: the objective, exact resume, divergence handling, DDP against one process, loss log and sample grids."""

import csv
import math
import os
import signal
import subprocess
import sys
import types
from dataclasses import replace

import pytest
import torch
from PIL import Image

from lessons_lib import train as T
from lessons_lib.checkpoint import load_pretrained
from lessons_lib.data import ImageDataset, find_fashion_mnist
from lessons_lib.device import randn
from lessons_lib.pipeline import DiffusionPipeline
from lessons_lib.samplers import get_sampler, sample
from lessons_lib.schedules import get_schedule
from lessons_lib.unet import UNet


def _dataset(n=48, size=16):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)
    return ImageDataset(images, torch.randint(0, 10, (n,), generator=g), [str(i) for i in range(10)], "synthetic")


def _cfg(tmp_path, **kw):
    return T.preset("tiny", **{"out_dir": str(tmp_path), "checkpoint_every": 100, "log_every": 1, **kw})


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


@pytest.fixture
def small_grids(monkeypatch):
    """Grids of 2 columns and 3 DDIM steps: the same code path as 8 x 50, in a fraction of the time."""
    monkeypatch.setattr(T, "GRID_COLUMNS", 2)
    monkeypatch.setattr(T, "GRID_STEPS", 3)


def _read_loss_csv(path):
    with open(path, newline="") as f:
        header, *rows = csv.reader(f)
    assert header == ["step", "loss"]
    return [(int(s), float(v)) for s, v in rows]


def test_min_snr_weights_closed_form():
    s = get_schedule("linear", 1000)
    t = torch.tensor([0, 300, 999])
    snr = s.snr[t]
    g = 5.0
    torch.testing.assert_close(T.loss_weights(t, s, "eps", "min_snr", g), (torch.clamp(snr, max=g) / snr).float())
    torch.testing.assert_close(T.loss_weights(t, s, "v", "min_snr", g), (torch.clamp(snr, max=g) / (snr + 1)).float())
    torch.testing.assert_close(T.loss_weights(t, s, "x0", "min_snr", g), torch.clamp(snr, max=g).float())
    assert T.loss_weights(t, s, "eps", "min_snr", g)[0] < 1 and T.loss_weights(t, s, "eps", "min_snr", g)[2] == 1
    z = get_schedule("linear", 1000, zero_terminal_snr=True)
    assert T.loss_weights(torch.tensor([999]), z, "eps", "min_snr", g).item() == 1.0  # SNR = 0: the limit, not NaN
    assert torch.equal(T.loss_weights(t, s, "eps", "uniform", g), torch.ones(3))


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "flow"])
def test_eps_loss_weight_is_the_ratio_of_squared_errors(prediction):
    """At a fixed x_t, an error in eps carried through convert_prediction scales the target's squared error by c_t."""
    from lessons_lib.noising import convert_prediction, q_sample

    schedule = get_schedule("cosine", 1000)
    t = torch.tensor([3, 250, 500, 900])
    x0, eps, err = (randn((4, 1, 4, 4), seed=s).double() for s in (1, 2, 3))
    xt = q_sample(x0, t, eps, schedule)
    as_target = lambda e: convert_prediction(e, "eps", prediction, xt, t, schedule)  # noqa: E731
    ratio = (as_target(eps + err) - as_target(eps)).pow(2).sum((1, 2, 3)) / err.pow(2).sum((1, 2, 3))
    torch.testing.assert_close(ratio, T.eps_loss_weight(t, schedule, prediction))


def test_objective_density_closed_forms():
    """Kingma & Gao 2023's weightings: rectified flow with uniform t is w = e^(-lambda / 2) / 2 (as v prediction on
    the cosine schedule, up to a constant); eps on cosine is sech(lambda / 2) / (2 pi); logit-normal t adds the
    normal density of lambda = -2 logit(t), times flow's (1 + e^(-lambda / 2))^2."""
    normal = torch.distributions.Normal(0.0, 2.0)
    cases = [
        (dict(prediction="flow", schedule="flow"), lambda lam: (-lam / 2).exp() / 2),
        (dict(prediction="v"), lambda lam: (-lam / 2).exp() / math.pi),
        (dict(prediction="eps"), lambda lam: 1 / (lam / 2).cosh() / (2 * math.pi)),
        (dict(prediction="flow", schedule="flow", timesteps="logsnr_normal", logsnr_mean=0.0, logsnr_std=2.0),
         lambda lam: normal.log_prob(lam).exp() * (1 + (-lam / 2).exp()) ** 2),
    ]
    for kw, closed in cases:  # the cosine schedule's offset s = 0.008 moves its curves by < 2 % for |lambda| < 5
        lam, w = T.objective_density(T.TrainConfig(max_steps=1, **kw))
        inside = lam.abs() < 5
        torch.testing.assert_close(w[inside], closed(lam[inside]).to(w.dtype), rtol=0.02, atol=0, msg=str(kw))
    with pytest.raises(ValueError, match="unknown prediction type 'velocity'"):
        T.eps_loss_weight(torch.tensor([1]), get_schedule("cosine", 10), "velocity")


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "flow"])
def test_oracle_has_zero_loss(prediction, tmp_path):
    """A model that returns the exact target scores 0: the target matches the parametrisation."""
    from lessons_lib.noising import convert_prediction

    s = get_schedule("cosine", 100)
    cfg = _cfg(tmp_path, prediction=prediction, num_steps=100)
    x0, eps = torch.rand(4, 1, 8, 8) * 2 - 1, torch.randn(4, 1, 8, 8)
    t = torch.tensor([0, 10, 50, 99])
    oracle = lambda xt, t_, y: convert_prediction(eps, "eps", prediction, xt, t_, s)  # noqa: E731
    assert T.diffusion_loss(oracle, x0, t, eps, None, s, cfg).item() < 1e-8


def test_batches_cover_each_epoch_once():
    seen = torch.cat([T.batch_indices(20, 4, seed=1, step=s) for s in range(5)])
    assert sorted(seen.tolist()) == list(range(20))
    assert torch.equal(T.batch_indices(20, 4, 1, 5), T.batch_indices(20, 4, 1, 5))
    assert not torch.equal(T.batch_indices(20, 4, 1, 0), T.batch_indices(20, 4, 1, 5))  # a new permutation
    with pytest.raises(ValueError, match="larger than the dataset"):
        T.batch_indices(3, 4, 0, 0)


def test_resume_is_exact(tmp_path):
    """N steps + resume + M steps == N + M steps in one go (weights, EMA and optimizer state)."""
    ds = _dataset()
    straight = T.train(_cfg(tmp_path / "a", max_steps=7), ds, progress=False)
    T.train(_cfg(tmp_path / "b", max_steps=4), ds, progress=False)
    resumed = T.train(_cfg(tmp_path / "b", max_steps=7), ds, progress=False)
    assert resumed.step == straight.step == 7
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(straight.ema.state_dict().values(), resumed.ema.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [s for s, _ in resumed.history] == list(range(1, 8))
    model, config = load_pretrained(tmp_path / "b")  # the inference weights are the EMA
    for a, b in zip(model.state_dict().values(), resumed.ema.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert config["step"] == 7 and config["weights"] == "ema"
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "b", device="cpu")  # what sampling needs comes with it
    assert pipe.image_shape == (1, 16, 16) and pipe.classes == ds.classes and pipe.prediction == "eps"
    assert torch.equal(pipe.schedule.betas, get_schedule("cosine", 100).betas)


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    ds = _dataset()
    real, calls = T.diffusion_loss, {"n": 0}

    def breaks_at_step_5(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(T, "diffusion_loss", breaks_at_step_5)
    with pytest.raises(T.TrainingDivergedError, match="loss is nan at step 4; stopped without writing"):
        T.train(_cfg(tmp_path, max_steps=10, checkpoint_every=2), ds, progress=False)
    state = torch.load(tmp_path / T.RESUME, weights_only=True)
    assert state["step"] == 4
    assert [s for s, _ in _read_loss_csv(tmp_path / T.LOSS_CSV)] == [1, 2, 3, 4]  # written with each checkpoint
    assert not list(tmp_path.glob("*.tmp"))  # no half-written files


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="unknown prediction 'noise'; allowed: eps, x0, v"):
        T.TrainConfig(prediction="noise", max_steps=1)
    with pytest.raises(ValueError, match="say how long to train"):
        T.TrainConfig()
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        T.preset("huge")
    with pytest.raises(ValueError, match=r"class_dropout must lie in \[0, 1\)"):
        T.TrainConfig(max_steps=1, class_dropout=1.0)
    with pytest.raises(ValueError, match="sample_every must be >= 1, got 0"):
        T.TrainConfig(max_steps=1, sample_every=0)
    with pytest.raises(ValueError, match="unknown amp 'fp8'; allowed: auto, bf16, fp16, off"):
        T.TrainConfig(max_steps=1, amp="fp8")
    assert T.TrainConfig(max_steps=1, amp=True).amp == "auto" and T.TrainConfig(max_steps=1, amp=False).amp == "off"
    cfg = _cfg(tmp_path)
    assert T.TrainConfig.from_dict(cfg.to_dict()) == cfg
    older = {k: v for k, v in cfg.to_dict().items() if k != "sample_every"}  # a config saved before the field existed
    assert T.TrainConfig.from_dict(older) == cfg


def test_bf16_autocast_on_cpu(tmp_path, monkeypatch):
    """amp='bf16' runs the network in bf16 on the CPU, keeps fp32 weights, and lands near the fp32 run."""
    ds = _dataset()
    seen = set()
    real = T.diffusion_loss

    def records_dtype(model, x0, *args, **kwargs):
        handle = model.stem.register_forward_hook(lambda mod, inp, out: seen.add(out.dtype))
        try:
            return real(model, x0, *args, **kwargs)
        finally:
            handle.remove()

    monkeypatch.setattr(T, "diffusion_loss", records_dtype)
    fp32 = T.train(_cfg(tmp_path / "fp32", max_steps=3, amp="off"), ds, progress=False)
    assert seen == {torch.float32}
    seen.clear()
    bf16 = T.train(_cfg(tmp_path / "bf16", max_steps=3, amp="bf16"), ds, progress=False)
    assert seen == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())
    torch.testing.assert_close([v for _, v in bf16.history], [v for _, v in fp32.history], rtol=0.02, atol=0)
    torch.manual_seed(0)
    w0 = torch.nn.utils.parameters_to_vector(UNet(bf16.model.config).parameters())
    a, b = (torch.nn.utils.parameters_to_vector(r.model.parameters()) for r in (fp32, bf16))
    assert (b - a).norm() < 0.3 * (a - w0).norm()  # bf16 moves the weights where fp32 does, give or take rounding
    with pytest.raises(ValueError, match="amp='fp16' needs a GPU"):
        T.train(_cfg(tmp_path / "fp16", max_steps=1, amp="fp16", device="cpu"), ds, progress=False)


@pytest.mark.skipif(find_fashion_mnist("train") is None, reason="Fashion-MNIST not installed")
def test_torchrun_two_processes_match_one(tmp_path):
    """DDP over 2 CPU processes (gloo) trains the same weights as one process on the same global batch."""
    args = ["-m", "lessons_lib", "train", "--preset", "tiny", "--max-steps", "3", "--no-progress", "--device", "cpu",
            "--amp", "off"]  # fp32: the processes add gradients in another order, which bf16 rounding would magnify
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *args, "--out-dir", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                          *args, "--out-dir", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    a = torch.load(tmp_path / "one" / T.RESUME, weights_only=True)
    b = torch.load(tmp_path / "two" / T.RESUME, weights_only=True)
    assert a["step"] == b["step"] == 3
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-4, atol=1e-5, msg=key)


def test_torchrun_processes_whose_clocks_disagree_stop_after_the_same_step(tmp_path):
    """A minutes budget under torchrun: process 1's clock runs at a quarter of process 0's speed, so alone it would
    train four times longer and wait forever for process 0's gradients. Both must stop when process 0's time is up."""
    script = tmp_path / "skewed_clock.py"
    script.write_text(
        "import os, sys, time, types\n"
        "import torch\n"
        "from lessons_lib import train as T\n"
        "from lessons_lib.data import ImageDataset\n"
        "rate = 1.0 if os.environ['RANK'] == '0' else 0.25\n"
        "T.time = types.SimpleNamespace(perf_counter=lambda: rate * time.perf_counter(), time=time.time)\n"
        "g = torch.Generator().manual_seed(0)\n"
        "ds = ImageDataset(torch.randint(0, 256, (48, 1, 16, 16), generator=g, dtype=torch.uint8),\n"
        "                  torch.randint(0, 10, (48,), generator=g), [str(i) for i in range(10)], 'synthetic')\n"
        "cfg = T.preset('tiny', max_steps=None, minutes=0.05, device='cpu', amp='off', out_dir=sys.argv[1])\n"
        "result = T.train(cfg, ds, progress=False)\n"
        "print(f'rank {os.environ[\"RANK\"]} stopped at step {result.step}', flush=True)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29518",
                          str(script), str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=120)
    assert two.returncode == 0, two.stderr
    steps = {int(line.split()[-1]) for line in two.stdout.splitlines() if "stopped at step" in line}
    assert len(steps) == 1 and steps.pop() == torch.load(tmp_path / "out" / T.RESUME, weights_only=True)["step"] > 0


@pytest.mark.parametrize("variant", ["attention", "simple"])  # simple: BatchNorm, whose statistics sampling must not touch
def test_sample_grids_leave_training_bit_identical(tmp_path, variant, small_grids):
    """Grids of EMA samples every 2 steps (and at the end) are written, and the weights match a run without them."""
    ds = _dataset()
    model = replace(T.preset("tiny").model, variant=variant)
    plain = T.train(_cfg(tmp_path / "plain", max_steps=5, model=model), ds, progress=False)
    drawn = T.train(_cfg(tmp_path / "drawn", max_steps=5, model=model, sample_every=2), ds, progress=False)
    _assert_same_weights(plain.model, drawn.model)
    _assert_same_weights(plain.ema, drawn.ema)
    assert [p.name for p in drawn.samples] == ["step_0000002.png", "step_0000004.png", "step_0000005.png"]
    for path in drawn.samples:
        assert path.parent == tmp_path / "drawn" / T.SAMPLES_DIR
        with Image.open(path) as img:
            assert img.format == "PNG"
    assert plain.samples == [] and not (tmp_path / "plain" / T.SAMPLES_DIR).exists()
    assert not list(tmp_path.rglob("*.tmp"))


def test_resume_keeps_earlier_grids_and_the_loss_log(tmp_path, small_grids):
    ds = _dataset()
    T.train(_cfg(tmp_path, max_steps=3, sample_every=2), ds, progress=False)
    result = T.train(_cfg(tmp_path, max_steps=5, sample_every=2), ds, progress=False)
    assert [p.name for p in result.samples] == [f"step_000000{s}.png" for s in (2, 3, 4, 5)]
    assert _read_loss_csv(tmp_path / T.LOSS_CSV) == result.history  # exact: floats are written with repr
    assert [s for s, _ in result.history] == [1, 2, 3, 4, 5]


def test_sample_grid_rows_are_classes_from_the_same_noises(tmp_path):
    """Grid image (row r, column j) is class r sampled alone from the noise of seed + j, DDIM with trailing steps."""
    cfg = _cfg(tmp_path, seed=3)
    torch.manual_seed(0)
    model = UNet(cfg.model)  # in training mode: the grid switches to eval and back
    grid = T.sample_grid(model, cfg, image_size=16, columns=3, steps=5)
    assert grid.shape == (30, 1, 16, 16) and model.training
    sampler = get_sampler("ddim", get_schedule(cfg.schedule, cfg.num_steps), 5, spacing="trailing")
    model.eval()
    for row, col in [(0, 0), (7, 2), (9, 1)]:
        alone = sample(model, randn((1, 1, 16, 16), seed=3 + col), sampler, torch.tensor([row]), progress=False).images
        torch.testing.assert_close(grid[3 * row + col], alone[0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(grid[0], grid[3 * 7])  # the class changes the image
    uncond = replace(cfg, model=replace(cfg.model, num_classes=None))
    torch.manual_seed(0)
    images = T.sample_grid(UNet(uncond.model), uncond, image_size=16, columns=3, steps=5)
    assert images.shape == (9, 1, 16, 16) and not torch.allclose(images[0], images[3])  # 9 different noises


def test_plot_loss_draws_the_history_and_its_running_mean():
    history = [(s, 1.0 / s) for s in range(1, 101)]
    raw, mean = T.plot_loss(history).axes[0].lines
    assert list(raw.get_xdata()) == list(range(1, 101)) and list(raw.get_ydata()) == [v for _, v in history]
    assert mean.get_xdata()[0] == 2 and mean.get_ydata()[0] == pytest.approx((1 + 1 / 2) / 2)  # a window of 100 // 50
    assert len(T.plot_loss(history[:10]).axes[0].lines) == 1  # too short to smooth
    with pytest.raises(ValueError, match="history is empty"):
        T.plot_loss([])


@pytest.mark.skipif(find_fashion_mnist("train") is None, reason="Fashion-MNIST not installed")
def test_cli_sample_every(tmp_path, small_grids):
    from lessons_lib.cli import main

    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--max-steps", "2", "--sample-every", "2", "--no-progress",
                 "--device", "cpu", "--out-dir", str(out)]) == 0
    assert sorted(p.name for p in (out / T.SAMPLES_DIR).iterdir()) == ["step_0000002.png"]
    assert [s for s, _ in _read_loss_csv(out / T.LOSS_CSV)] == [2]  # the tiny preset logs every 25 steps and at the end


def test_ema_warmup_forgets_the_initial_weights():
    """After N updates from 0 towards 1, the start keeps prod (1 + n) / (10 + n) = 10! (N + 1)! / (N + 10)!."""
    update, N = T.ema_with_warmup(0.999), 49
    ema = [torch.zeros(3, dtype=torch.float64)]
    for n in range(1, N + 1):
        update(ema, [torch.ones(3, dtype=torch.float64)], torch.tensor(n))
    left = math.factorial(10) * math.factorial(N + 1) / math.factorial(N + 10)
    torch.testing.assert_close(ema[0], torch.full((3,), 1 - left, dtype=torch.float64))
    update(ema, [torch.ones(3, dtype=torch.float64)], torch.tensor(10**6))  # late updates use the configured decay
    torch.testing.assert_close(ema[0], torch.full((3,), 1 - left * 0.999, dtype=torch.float64))


def test_lr_factor_closed_forms():
    """Linear warm-up to 1, then constant, cosine (1 + cos(pi p)) / 2 or linear 1 - p with p the decay done."""
    assert [T.lr_factor(s, 4, 100, "cosine") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert T.lr_factor(52, 4, 100, "cosine") == pytest.approx(0.5)  # half way through the decay
    assert T.lr_factor(28, 4, 100, "cosine") == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert T.lr_factor(28, 4, 100, "linear") == pytest.approx(0.75)
    assert T.lr_factor(100, 4, 100, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert T.lr_factor(100, 4, 100, "linear") == 0.0
    assert T.lr_factor(80, 4, 100, "constant") == T.lr_factor(80, 4, None, "cosine") == 1.0  # no total yet: no decay


@pytest.mark.parametrize("sigma_rel, gamma", [(0.05, 16.97), (0.10, 6.94)])
def test_power_ema_gamma_matches_karras_2024(sigma_rel, gamma):
    """The pairs quoted in Karras et al. 2024 (sec. 3.1): sigma_rel 0.05 is gamma 16.97, 0.10 is 6.94."""
    assert T.power_ema_gamma(sigma_rel) == pytest.approx(gamma, abs=0.01)


def test_power_ema_weights_telescope():
    """With beta_n = (1 - 1/n)^(g+1), update n keeps weight (n/N)^(g+1) - ((n-1)/N)^(g+1) of theta_n after N
    updates (the product of later betas telescopes): the discrete form of the profile t^g."""
    sigma_rel, N = 0.1, 400
    gamma = T.power_ema_gamma(sigma_rel)
    update = T.power_ema(sigma_rel)
    thetas = torch.randn(N, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ema = [torch.zeros(3, dtype=torch.float64)]
    for n in range(1, N + 1):
        update(ema, [thetas[n - 1]], torch.tensor(n - 1))  # AveragedModel passes the updates made before this one
    n = torch.arange(1, N + 1, dtype=torch.float64)
    w = (n / N) ** (gamma + 1) - ((n - 1) / N) ** (gamma + 1)
    torch.testing.assert_close(ema[0], (w[:, None] * thetas).sum(0))
    ramp = [torch.zeros(1, dtype=torch.float64)]  # theta_n = n: the mean of t under t^g is (g + 1) / (g + 2) N
    for k in range(1, 10_001):
        update(ramp, [torch.tensor([float(k)], dtype=torch.float64)], torch.tensor(k - 1))
    assert ramp[0].item() == pytest.approx((gamma + 1) / (gamma + 2) * 10_000, rel=1e-3)


def test_logsnr_timesteps_pick_the_nearest_step():
    s = get_schedule("cosine", 1000)
    logsnr = s.snr.log()
    u = torch.randn(2000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = T.logsnr_timesteps(u, s, mean=2.4, std=2.4)
    target = (2.4 + 2.4 * u).clamp(float(logsnr[-1]), float(logsnr[0]))
    brute = (logsnr[None, :] - target[:, None]).abs().argmin(1)
    assert torch.equal(logsnr[t] - target, logsnr[brute] - target)  # as near as the nearest step (ties either way)
    assert 0 <= int(t.min()) and int(t.max()) < 1000
    cfg = T.preset("tiny", timesteps="logsnr_normal", num_steps=1000)
    drawn, _, _ = T.step_noise(cfg, 3, (500, 1, 4, 4))
    assert logsnr[drawn].mean().item() == pytest.approx(2.4, abs=0.3)  # log-SNR ~ N(2.4, 2.4): mostly low noise
    uniform, _, _ = T.step_noise(T.preset("tiny", num_steps=1000), 3, (500, 1, 4, 4))
    assert logsnr[uniform].mean().item() < 0  # uniform t on the cosine schedule: mostly high noise


def test_minutes_budget_plans_its_steps_once_and_resume_keeps_the_plan(tmp_path, monkeypatch):
    """A decaying schedule turns the minutes into a step count after the warm-up; an interrupted run resumed
    later ends at the same step with the same weights as one that was never interrupted."""
    ds = _dataset()
    monkeypatch.setattr(T, "PLAN_TIMED_SHARE", 0.0)  # plan at the end of the warm-up
    monkeypatch.setattr(T, "plan_steps", lambda step, seconds_per_step, seconds_left: 16)
    cfg = dict(minutes=60, max_steps=None, lr_schedule="cosine", warmup_steps=10, ema_sigma_rel=0.1)
    straight = T.train(_cfg(tmp_path / "a", **cfg), ds, progress=False)
    assert straight.step == 16 and torch.load(tmp_path / "a" / T.RESUME, weights_only=True)["total_steps"] == 16

    real, calls = T.diffusion_loss, {"n": 0}

    def interrupt_at_step_12(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 13:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "diffusion_loss", interrupt_at_step_12)
    assert T.train(_cfg(tmp_path / "b", **cfg), ds, progress=False).interrupted
    monkeypatch.setattr(T, "diffusion_loss", real)
    monkeypatch.setattr(T, "plan_steps", lambda *a: pytest.fail("a resumed run must keep its plan"))
    resumed = T.train(_cfg(tmp_path / "b", **cfg), ds, progress=False)
    assert resumed.step == 16
    _assert_same_weights(straight.model, resumed.model)
    _assert_same_weights(straight.ema, resumed.ema)
    with pytest.raises(ValueError, match="warmup_steps must be >= 10"):
        T.preset("tiny", minutes=5, max_steps=None, lr_schedule="cosine", warmup_steps=2)


def test_sigterm_ends_the_run_after_its_step_and_the_resumed_run_matches_one_never_stopped(tmp_path, monkeypatch):
    """``kill PID`` during step 5 lets that step finish, then the run saves and returns interrupted (no step is
    half-applied: resumed, it ends with the weights of a run never stopped); the handler goes when train returns."""
    ds = _dataset()
    straight = T.train(_cfg(tmp_path / "a"), ds, progress=False)
    real, calls = T.diffusion_loss, {"n": 0}

    def sigterm_during_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.SIG_IGN, None):
                pytest.fail("train() did not take over SIGTERM: the signal would end the test process")
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "diffusion_loss", sigterm_during_step_5)
    before = signal.getsignal(signal.SIGTERM)
    stopped = T.train(_cfg(tmp_path / "b"), ds, progress=False)
    assert stopped.interrupted and stopped.step == 5 and signal.getsignal(signal.SIGTERM) is before
    assert torch.load(tmp_path / "b" / T.RESUME, weights_only=True)["step"] == 5
    monkeypatch.setattr(T, "diffusion_loss", real)
    resumed = T.train(_cfg(tmp_path / "b"), ds, progress=False)
    assert resumed.step == straight.step == 10 and not resumed.interrupted
    _assert_same_weights(straight.model, resumed.model)
    _assert_same_weights(straight.ema, resumed.ema)


def test_the_plan_times_a_tenth_of_the_budget_not_the_warm_up_alone(tmp_path, monkeypatch):
    """A warm-up that runs at half speed (a busy start) must not cut the planned run short: the plan's timing goes
    on for a tenth of the budget. Fake clock: 0.2 s per step until step 10, then 0.1 s; a 1-minute budget fits
    10 + 58 / 0.1 = 590 steps, and timing the warm-up's second half alone would plan 10 + 58 / 0.2 = 300."""
    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(T, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))
    real, planned = T.diffusion_loss, []

    def timed_loss(*args, **kwargs):
        clock.now += 0.2 if timed_loss.steps < 10 else 0.1
        timed_loss.steps += 1
        return real(*args, **kwargs)

    timed_loss.steps = 0
    monkeypatch.setattr(T, "diffusion_loss", timed_loss)
    real_plan = T.plan_steps
    monkeypatch.setattr(T, "plan_steps", lambda *a: planned.append(a) or real_plan(*a))
    cfg = _cfg(tmp_path, minutes=1, max_steps=None, lr_schedule="cosine", warmup_steps=10, checkpoint_every=10_000)
    result = T.train(cfg, _dataset(), progress=False)
    (step, _, _), = planned
    assert step > 30  # timed for a tenth of the budget after the warm-up: ~6 s of 0.1-s steps
    assert abs(result.step - 590) / 590 < 0.15
    assert torch.load(tmp_path / T.RESUME, weights_only=True)["total_steps"] == result.step


def test_every_checkpoint_leaves_a_loadable_model_and_snapshots_are_kept(tmp_path, monkeypatch):
    """A run that dies (here: an error at step 3, no clean exit) leaves the EMA model of its last checkpoint."""
    ds = _dataset()
    real, calls = T.diffusion_loss, {"n": 0}

    def crash_at_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("the machine went away")
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "diffusion_loss", crash_at_step_3)
    with pytest.raises(RuntimeError, match="went away"):
        T.train(_cfg(tmp_path / "crash", max_steps=6, checkpoint_every=2), ds, progress=False)
    _, config = load_pretrained(tmp_path / "crash")
    assert config["step"] == 2 and config["weights"] == "ema"
    monkeypatch.setattr(T, "diffusion_loss", real)
    result = T.train(_cfg(tmp_path / "snap", max_steps=4, checkpoint_every=2, snapshot_every=2), ds, progress=False)
    for step in (2, 4):
        model, config = load_pretrained(tmp_path / "snap" / T.SNAPSHOTS_DIR / f"step_{step:07d}")
        assert config["step"] == step and config["weights"] == "ema"
    _assert_same_weights(model, result.ema)  # the last snapshot is the final EMA


def test_init_from_starts_a_new_run_from_saved_weights_and_refuses_another_network(tmp_path):
    """A run whose folder is lost continues from the model folder it left (the weights, not the optimizer)."""
    ds = _dataset()
    first = T.train(_cfg(tmp_path / "first", max_steps=3), ds, progress=False)
    again = T.train(_cfg(tmp_path / "again", max_steps=1, lr=1e-30, init_from=str(tmp_path / "first")), ds, progress=False)
    for a, b in zip(first.ema.state_dict().values(), again.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)  # one step of lr 1e-30 away from the saved EMA weights
    fresh = T.train(_cfg(tmp_path / "fresh", max_steps=1, lr=1e-30), ds, progress=False)
    assert not torch.allclose(fresh.model.stem.weight, again.model.stem.weight)  # not the random initialisation
    other_net = _cfg(tmp_path / "x", max_steps=1, init_from=str(tmp_path / "first"))
    other_net = replace(other_net, model=replace(other_net.model, base_channels=16))
    with pytest.raises(ValueError, match="does not fit this run: base_channels: 8 there, 16 here"):
        T.train(other_net, ds, progress=False)
    with pytest.raises(ValueError, match="prediction: 'eps' there, 'v' here"):
        T.train(_cfg(tmp_path / "y", max_steps=1, prediction="v", init_from=str(tmp_path / "first")), ds, progress=False)
    with pytest.raises(ValueError, match="changed init_from"):  # resuming "again" from other weights is refused
        T.train(_cfg(tmp_path / "again", max_steps=2, init_from=str(tmp_path / "fresh")), ds, progress=False)


def test_a_flow_model_trains_and_samples_through_the_pipeline(tmp_path):
    """prediction='flow' on the flow schedule: rectified flow's loss in the same trainer, sampled by the same pipeline."""
    ds = _dataset()
    with pytest.raises(ValueError, match="min_snr weighting is written for eps, v and x0"):
        _cfg(tmp_path / "x", prediction="flow", weighting="min_snr")
    result = T.train(_cfg(tmp_path / "flow", prediction="flow", schedule="flow", max_steps=3), ds, progress=False)
    assert all(math.isfinite(v) for _, v in result.history)
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "flow", device="cpu")
    assert pipe.prediction == "flow" and pipe.schedule.name == "flow" and float(pipe.schedule.alpha_bar[-1]) == 0
    images = pipe(2, 3, steps=4, sampler="dpmpp_2m", progress=False)[0]
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()
