"""The benchmarks' bookkeeping: an interrupted quality row resumes at its next batch with the same images; rows
keep their timestep spacing (files from before read as their one spacing); the objectives study picks the best
sampler per budget of network evaluations and builds the configs it names."""

import json
import sys

import pytest
import torch
from test_pipeline import Elementwise, S

from lessons_lib.config import REPO_ROOT
from lessons_lib.pipeline import DiffusionPipeline

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import quality_per_nfe as bench  # noqa: E402
import time_to_quality as ttq  # noqa: E402


class Interrupted(Exception):
    pass


def test_a_row_stopped_mid_way_resumes_at_its_next_batch(tmp_path, monkeypatch):
    pipe = DiffusionPipeline(Elementwise().eval(), S)
    whole, labels, _, nfe = bench.balanced_samples(pipe, "ddim", 5, 30, batch_size=10, progress=False)

    partial = tmp_path / "row.partial.pt"
    generate_batch, calls = pipe.generate_batch, []

    def stop_after_two(configs, **kw):
        if len(calls) == 2:
            raise Interrupted
        calls.append([c.seed for c in configs])
        return generate_batch(configs, **kw)

    monkeypatch.setattr(pipe, "generate_batch", stop_after_two)
    try:
        bench.balanced_samples(pipe, "ddim", 5, 30, batch_size=10, progress=False, partial=partial)
    except Interrupted:
        pass
    assert partial.is_file() and calls == [list(range(10)), list(range(10, 20))]

    calls.clear()
    monkeypatch.setattr(pipe, "generate_batch", lambda configs, **kw: calls.append([c.seed for c in configs])
                        or generate_batch(configs, **kw))
    images, resumed_labels, _, resumed_nfe = bench.balanced_samples(pipe, "ddim", 5, 30, batch_size=10,
                                                                   progress=False, partial=partial)
    assert calls == [list(range(20, 30))], "only the batch that was not finished runs again"
    torch.testing.assert_close(images, whole, rtol=0, atol=0)
    assert torch.equal(resumed_labels, labels) and resumed_nfe == nfe

    calls.clear()  # the same file for another row (other steps) is not reused
    bench.balanced_samples(pipe, "ddim", 4, 30, batch_size=10, progress=False, partial=partial)
    assert len(calls) == 3


def test_rows_keep_their_spacing_and_old_files_read_as_trailing(tmp_path):
    row = lambda sampler, steps, fid, **kw: {"sampler": sampler, "steps": steps, "nfe": steps, "fid": fid,  # noqa: E731
                                             "precision": 0.8, "recall": 0.8, "seconds_per_1000": 1.0, **kw}
    old = {"config": {"n": 1000, "spacing": "trailing", "reference_steps": 0},
           "rows": [row("dpmpp_2m", 10, 10.5), row("ddim", 10, 15.2)]}
    path = tmp_path / "q.json"
    path.write_text(json.dumps(old))
    results = bench.load_results(path)
    assert [r["spacing"] for r in results["rows"]] == ["trailing", "trailing"]
    results["rows"].append(row("dpmpp_2m", 10, 4.4, spacing="karras"))
    assert [bench.label(r) for r in results["rows"]] == ["dpmpp_2m", "ddim", "dpmpp_2m (karras)"]
    best = bench.best_at(results, 10)
    assert (best["spacing"], best["fid"]) == ("karras", 4.4)
    assert bench.summary(results)[-1].startswith("best at <= 10 NFE: dpmpp_2m (10 karras steps), FID 4.40")
    table = bench.format_table(results)
    assert "| dpmpp_2m | karras | 10 | 10 | 4.40 |" in table and "| dpmpp_2m | trailing | 10 | 10 | 10.50 |" in table
    a, b = (bench.balanced_samples(DiffusionPipeline(Elementwise().eval(), S), "dpmpp_2m", 5, 10, batch_size=10,
                                   progress=False, spacing=spacing)[0] for spacing in ("karras", "trailing"))
    assert not torch.equal(a, b)  # the spacing reaches the sampler


def test_the_study_scores_each_budget_by_its_best_sampler_and_builds_its_candidates():
    entry = {"config": {"schedule": "cosine", "num_steps": 1000},
             "final": [{"sampler": "ddim", "steps": 50, "fid": 30.0}, {"sampler": "dpmpp_2m", "steps": 20, "fid": 12.0}],
             "few_step": [{"sampler": "ddim", "steps": 20, "fid": 14.0}, {"sampler": "dpmpp_2m", "steps": 50, "fid": 25.0},
                          {"sampler": "heun", "steps": 3, "fid": 40.0}, {"sampler": "ddim", "steps": 5, "fid": 41.0}]}
    best = ttq.best_per_budget(entry)
    assert list(best) == [5, 20, 50]  # heun with 3 steps costs 2 * 3 - 1 = 5 evaluations
    assert [best[n]["sampler"] for n in best] == ["heun", "dpmpp_2m", "dpmpp_2m"]
    flow = ttq.candidate_config("flow+logit_normal", images=1280, every=5)
    assert (flow.prediction, flow.schedule, flow.weighting, flow.timesteps) == ("flow", "flow", "uniform", "logsnr_normal")
    assert (flow.logsnr_mean, flow.logsnr_std, flow.max_steps, flow.amp) == (0.0, 2.0, 10, "auto")


def test_size_candidates_change_the_network_and_train_for_minutes():
    wide = ttq.candidate_config("base48", images=None, every=5, minutes=30)
    assert (wide.model.base_channels, wide.model.num_res_blocks, wide.batch_size) == (48, 1, 128)
    assert (wide.minutes, wide.max_steps, wide.lr_schedule) == (30, None, "constant")
    assert wide.out_dir.endswith("/base48-30min") and ttq.candidate_config("flags", 1280, 5).out_dir.endswith("/flags")
    deep = ttq.candidate_config("res2", images=1280, every=5)
    assert (deep.model.num_res_blocks, deep.model.base_channels, deep.max_steps) == (2, 32, 10)
    assert ttq.candidate_config("batch64+lr1e-3", images=1280, every=5).max_steps == 20
    for bad in (dict(name="flags", images=1280, minutes=30), dict(name="hf_course", images=None, minutes=30)):
        with pytest.raises(SystemExit):
            ttq.candidate_config(bad["name"], bad["images"], 5, bad["minutes"])


def test_the_long_preset_trains_the_candidate_its_150_minute_study_measured():
    """The long preset is the study's base-48 candidate at 150 minutes in every field that shapes the training."""
    from lessons_lib.train import preset

    measured = ttq.candidate_config("base48+batch64+cosine+power_ema", images=None, every=750, minutes=150).to_dict()
    shipped_run = preset("long").to_dict()
    recipe = ("model", "prediction", "weighting", "timesteps", "schedule", "batch_size", "lr", "lr_schedule",
              "warmup_steps", "ema_sigma_rel", "class_dropout", "compile", "minutes", "max_steps")
    assert {k: shipped_run[k] for k in recipe} == {k: measured[k] for k in recipe}


def test_a_resumed_candidate_trains_what_is_left_of_its_minutes_unless_it_planned_its_steps(tmp_path, monkeypatch):
    """Stopped after 10 of its 30 minutes, a constant-rate candidate asks the trainer for the other 20; a decaying
    one keeps its 30 (the trainer refuses a changed budget once it has planned its steps from it)."""
    import types

    asked = []
    monkeypatch.setattr(ttq, "RUNS", tmp_path)
    monkeypatch.setattr(ttq.T, "train", lambda cfg, progress: asked.append(cfg.minutes)
                        or types.SimpleNamespace(step=7, interrupted=True))
    for name in ("batch64", "batch64+cosine+power_ema"):
        out = tmp_path / f"{name}-30min"
        out.mkdir()
        (out / "ttq.json").write_text(json.dumps({"train_s": 600.0}))
        args = types.SimpleNamespace(name=name, minutes=30.0, images=None, every=5, no_progress=True)
        with pytest.raises(SystemExit, match="interrupted"):
            ttq.run(args)
        assert json.loads((out / "ttq.json").read_text())["step"] == 7
    assert asked == pytest.approx([20.0, 30.0])


def test_a_planned_candidate_that_ended_early_on_its_clock_goes_straight_to_scoring(tmp_path, monkeypatch):
    """A decaying candidate ends at its planned step, here 2 s before its 30 minutes: run again, it scores the
    weights without starting the trainer (which would add its start-up to the ledger's seconds)."""
    import types

    monkeypatch.setattr(ttq, "RUNS", tmp_path)
    monkeypatch.setattr(ttq.T, "train", lambda cfg, progress: pytest.fail("a finished run was trained again"))
    scored = []
    monkeypatch.setattr(ttq, "fid_curve", lambda args, snapshots, batch_size, images_per_s: [])
    monkeypatch.setattr(ttq, "write_result", lambda args, out, config, ledger, *rest: scored.append(ledger))
    out = tmp_path / "batch64+cosine+power_ema-30min"
    out.mkdir()
    (out / ttq.T.RESUME).write_bytes(b"")
    (out / "ttq.json").write_text(json.dumps({"train_s": 1798.0, "step": 2_000, "finished": True}))
    args = types.SimpleNamespace(name="batch64+cosine+power_ema", minutes=30.0, images=None, every=5,
                                 no_progress=True, final=[], ddpm=False)
    ttq.run(args)
    assert scored and scored[0]["train_s"] == 1798.0 and scored[0]["images_per_s"] == pytest.approx(64 * 2_000 / 1798)


def test_the_hf_course_recipe_pads_flips_and_shares_the_cosine_schedule():
    import hf_course_recipe as hf
    from diffusers import DDPMScheduler

    schedule = hf.course_schedule()  # raises if the course's cosine differs from squaredcos_cap_v2
    ours = schedule.alpha_bar[[0, 500, 999]].double()
    theirs = DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod[[0, 500, 999]].double()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    images = torch.randint(0, 256, (100, 1, 28, 28), dtype=torch.uint8)
    x = hf.batch(images, step=3)
    assert x.shape == (64, 1, 32, 32) and x.min() >= -1 and x.max() <= 1
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:-2, 2:-2] = False
    assert (x[:, 0][:, border] == -1).all()  # padded with background
    from lessons_lib.data import to_model
    from lessons_lib.train import batch_indices

    plain = to_model(images[batch_indices(100, 64, 0, 3)])
    inner = x[..., 2:-2, 2:-2]
    same = (inner == plain).flatten(1).all(1)
    mirrored = (inner == plain.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all() and 10 < (mirrored & ~same).sum() < 54  # about half flipped left-right


def test_the_hf_course_recipe_resumes_where_it_stopped(tmp_path, monkeypatch):
    """Stopped at its time limit and run again with a longer one, the recipe ends with the weights of one run."""
    import types

    import hf_course_recipe as hf
    from safetensors.torch import load_file

    for key, value in (("block_out_channels", (32, 32, 32, 32)), ("layers_per_block", 1), ("batch_size", 4)):
        monkeypatch.setitem(hf.RECIPE, key, value)
    data = types.SimpleNamespace(images=torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8))
    monkeypatch.setattr(hf, "load_fashion_mnist", lambda split: data)

    def fake_clock():  # one second per reading: the step count follows from the budget alone
        fake_clock.now += 1.0
        return fake_clock.now

    fake_clock.now = 0.0
    monkeypatch.setattr(hf, "time", types.SimpleNamespace(perf_counter=fake_clock))
    whole = hf.train(tmp_path / "whole", minutes=0.2, every=2, progress=False)
    first = hf.train(tmp_path / "parts", minutes=0.1, every=2, progress=False)["step"]
    parts = hf.train(tmp_path / "parts", minutes=0.2, every=2, progress=False)
    assert 0 < first < parts["step"] == whole["step"]
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "parts" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_latent_study_measures_psnr_against_its_definition_and_names_valid_candidates(tmp_path, monkeypatch):
    import latent_diffusion as ld

    from lessons_lib.autoencoder import Autoencoder, save_autoencoder
    from lessons_lib.data import ImageDataset

    shapes = {name: cfg.latent_shape(28) for name, cfg in ld.AUTOENCODERS.items()}
    assert shapes["f4c4"] == (4, 7, 7) and shapes["f2c2"] == (2, 14, 14) and shapes["f4c8"] == (8, 7, 7)
    torch.manual_seed(0)
    model = Autoencoder(base_channels=8, channel_mults=(1, 2), latent_channels=2, scale_factor=1.0).eval()
    save_autoencoder(model, tmp_path)
    images = torch.randint(0, 256, (20, 1, 28, 28), dtype=torch.uint8)
    ds = ImageDataset(images, torch.arange(20) % 10, [str(i) for i in range(10)], "synthetic")
    monkeypatch.setattr(ld, "load_fashion_mnist", lambda split: ds)
    monkeypatch.setattr(ld, "FLOOR_N", 12)
    scores = ld.reconstruction_scores(tmp_path)
    with torch.no_grad():
        x = images.float() / 127.5 - 1
        mse = (model.decode(model.encode(x).mean).clamp(-1, 1) - x).square().flatten(1).mean(1)
    assert abs(scores["test_mse"] - mse.mean().item()) < 1e-6
    assert abs(scores["test_psnr_db"] - (10 * torch.log10(4 / mse)).mean().item()) < 1e-4  # peak-to-peak 2: 2^2 / MSE
    assert scores["n"] == 12
