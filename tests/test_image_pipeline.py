"""The image pipeline: every image experiment config end to end on fake data trees and tiny nets, EMA in the
score stage, schedule checks, the image sampler's start, grids, FID fallback and label consistency."""

from __future__ import annotations

import io
import json
import logging
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from experiments import images
from experiments.pipeline import ConfigError, run
from experiments.startup import read_run, sampler_settings
from scones.data.images import DigitsImages
from scones.models.score import ScoreModule, dsm_loss
from scones.nets.ncsn import NCSN, NCSNv2
from scones.sampling.conditional import LearnedPriorScore, initial_chains
from scones.sampling.schedules import geometric_sigmas
from tests.fakedata import write_fake_celeba, write_fake_mnist, write_fake_usps
from tests.helpers import make_cfg

ROOT = Path(__file__).resolve().parents[1]
IMAGE_EXPERIMENTS = ["digits", "usps_mnist", "mnist_usps", "celeba32", "celeba64"]


class TinyFeatures(nn.Module):
    """Offline FID feature extractor for tests: per-channel means and a 2×2 average-pooled grey image."""

    num_features = 7

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grey = torch.nn.functional.adaptive_avg_pool2d(x.mean(1, keepdim=True), 2).flatten(1)
        return torch.cat([x.mean(dim=(2, 3)), grey], dim=1)


TINY_COMMON = [
    "dual.steps=3", "dual.batch_size=16", "dual.net.hidden=[16]",
    "score.steps=2", "score.batch_size=8", "score.net.ngf=4", "score.n_levels=4", "score.sigma_max=1.0",
    "bp.steps=2", "bp.batch_size=8",
    "sampler.n_steps_each=1", "sampler.skip_levels=1",
    "eval.n_samples=8", "eval.batch_size=8", "eval.grid.n_sources=2", "eval.grid.samples_per_source=2",
    "eval.fid.feature_extractor={_target_:tests.test_image_pipeline.TinyFeatures}", "eval.fid.n_real=8",
    "eval.score_grid.every_n_steps=1", "eval.score_grid.n_samples=4", "eval.score_grid.n_steps_each=1",
    "eval.label_consistency.epochs=1", "checkpoint_every=1000",
]  # fmt: skip
TINY_FAMILY = {"digits": ["bp.net.hidden=[16]"], "celeba": ["bp.net.ngf=4", "data.resolution=16"]}


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("image_data")
    write_fake_usps(root, n=30, train=True, seed=1)
    write_fake_mnist(root, n_train=40, n_test=10, seed=2)
    write_fake_celeba(root, splits=(0, 0, 0, 0, 1, 2))
    return root


def tiny(name: str, data_dir: Path) -> list[str]:
    family = "celeba" if name.startswith("celeba") else "digits"
    return [f"+experiment={name}", f"paths.data_dir={data_dir}", "num_threads=1", *TINY_COMMON, *TINY_FAMILY[family]]


@pytest.mark.parametrize("name", IMAGE_EXPERIMENTS)
def test_image_experiment_runs_end_to_end(tmp_path, fake_root, name):
    cfg = make_cfg(tmp_path, tiny(name, fake_root))
    run_dir = tmp_path / "run"
    m = run(cfg, run_dir)
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["methods"].keys() == {"scones", "bp", "independent"}
    # FID with the configured offline extractor: finite, and exactly 0 nowhere (independent sets of images)
    fid = saved["fid"]
    assert fid["extractor"] == "custom" and fid["skipped"] is None and fid["n_real"] == 8
    # FID of identical sets is 0 up to float round-off (seen: −6e-9)
    assert all(np.isfinite(fid[k]) and fid[k] >= -1e-6 for k in ("scones", "bp", "independent", "source"))
    # samples.npz keeps the x / y / y_bp contract, as images (n, C, H, W)
    arrays = np.load(run_dir / "samples.npz")
    side = cfg.data.get("size") or cfg.data.resolution
    shape = (8, cfg.data.channels, side, side)
    assert arrays["x"].shape == arrays["y"].shape == arrays["y_bp"].shape == shape
    assert np.isfinite(arrays["y"]).all() and ((arrays["y_bp"] > 0) & (arrays["y_bp"] < 1)).all()  # BP: tanh/sigmoid
    labelled = not name.startswith("celeba")
    assert ("x_labels" in arrays) == labelled
    assert ("label_consistency" in saved["methods"]["scones"]) == labelled
    if labelled:
        assert arrays["x_labels"].shape == (8,) and 0 <= saved["methods"]["bp"]["label_consistency"] <= 1
    if labelled:  # feature FID / KID in the digit classifier's feature space, with the target-vs-target floor
        ffid = saved["feature_fid"]
        assert ffid["fid"].keys() == ffid["kid"].keys() == {"scones", "bp", "independent", "source", "target_floor"}
        assert all(np.isfinite(v) for v in ffid["fid"].values()) and ffid["n_per_set"] >= 2
    else:
        assert "feature_fid" not in saved
    if "background" in saved:  # pixels the target set leaves black: mean |y| there per method, and of the targets
        assert saved["background"]["pixels"] > 0 and saved["background"]["target"] >= 0
        assert all(np.isfinite(saved["methods"][k]["background"]) for k in ("scones", "bp", "independent"))
    # grid: 2 sources x (source | 2 SCONES samples | BP), captioned (above the grid) when feature FID exists
    with Image.open(run_dir / "samples_grid.png") as im:
        cell = 2 + shape[-1] * max(1, math.ceil(48 / shape[-1]))
        if labelled:
            assert im.size[0] >= 4 * cell + 2 and im.size[1] > 2 * cell + 2
        else:
            assert im.size == (4 * cell + 2, 2 * cell + 2)
    score_dir = Path(m["stages"]["score"]["dir"])
    assert sorted(p.name for p in (score_dir / "samples").glob("*.png")) == ["step000001.png", "step000002.png"]


@pytest.mark.parametrize("name", IMAGE_EXPERIMENTS)
@pytest.mark.parametrize("reg, lam", [("kl", 0.005), ("chi2", 0.01)])
def test_both_regularisers_reachable_by_override(tmp_path, fake_root, name, reg, lam):
    """`regularizer=kl regularizer.lam=0.005` (and chi2) replaces the experiment's regulariser wholesale."""
    from experiments.pipeline import build_problem
    from experiments.validation import validate_config
    from scones.ot import KL, ChiSquared

    cfg = make_cfg(tmp_path, [*tiny(name, fake_root), f"regularizer={reg}", f"regularizer.lam={lam}"])
    validate_config(cfg)
    _, _, _, regularizer = build_problem(cfg)
    assert isinstance(regularizer, KL if reg == "kl" else ChiSquared) and regularizer.lam == lam


def _digits_cfg(tmp_path, *extra):
    return make_cfg(tmp_path, ["+experiment=digits", "num_threads=1", *TINY_COMMON, *TINY_FAMILY["digits"], *extra])


def test_fid_missing_inception_weights_is_null_with_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty hub cache
    monkeypatch.delenv("FID_INCEPTION_WEIGHTS", raising=False)
    cfg = _digits_cfg(tmp_path, "eval.fid.feature_extractor=null", "eval.label_consistency.enabled=false")
    with caplog.at_level(logging.WARNING, logger="experiments.images"):
        run(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["fid"]["scones"] is None and saved["fid"]["bp"] is None and saved["fid"]["source"] is None
    assert "FID_INCEPTION_WEIGHTS" in saved["fid"]["skipped"] and "FID skipped" in caplog.text
    assert "label_consistency" not in saved["methods"]["scones"]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["score.net.sigmas.n_levels=5"], "score.net holds 5 noise levels"),
        (["sampler.n_levels=7"], "sampler.sigma_max/sigma_min/n_levels must give levels"),
        (["data.channels=3"], "not a whole number of 3-channel images"),
    ],
)
def test_schedule_and_channel_mismatches_are_config_errors(tmp_path, overrides, match):
    cfg = _digits_cfg(tmp_path, "sampler.sigma_max=1.0", "sampler.sigma_min=0.01", "sampler.n_levels=4", *overrides)
    with pytest.raises(ConfigError, match=match):
        run(cfg, tmp_path / "run")


def test_image_chains_start_at_the_first_level_run(tmp_path):
    # spec §3b: skip 3 of 10 levels 1 -> 0.01, start at BP(x) + sigma_4 z with sigma_4 = 10^(-2/3) ≈ 0.2154
    cfg = make_cfg(tmp_path, ["+experiment=usps_mnist"])
    assert cfg.sampler.skip_levels == 3 and cfg.sampler.init == "bp_noise"
    x = torch.zeros(4000, 1, 4, 4)
    y_bp = torch.full_like(x, 0.5)
    y0 = initial_chains(sampler_settings(cfg), x, y_bp, torch.Generator().manual_seed(0))
    noise = (y0 - y_bp).flatten()
    sigma4 = float(geometric_sigmas(1.0, 0.01, 10)[3])
    assert sigma4 == pytest.approx(10 ** (-2 / 3), rel=1e-5)
    # std of 64 000 N(0, s^2) draws: relative standard error ≈ 1/sqrt(2n) ≈ 0.003
    assert float(noise.std()) == pytest.approx(sigma4, rel=0.015) and abs(float(noise.mean())) < 0.005


def test_sampler_levels_map_to_sigmas_for_noise_agnostic_nets(tmp_path):
    # an NCSNv2 trained on 4 levels can be sampled on any schedule: level i of the sampler means sigma_i of the sampler
    cfg = make_cfg(tmp_path, ["+experiment=celeba32", "score.n_levels=4", "sampler.sigma_max=9", "sampler.n_levels=6"])
    net = NCSNv2(3, ngf=4, sigmas=geometric_sigmas(50.0, 0.01, 4))
    module = ScoreModule(net, net.sigmas)
    prior = LearnedPriorScore.for_sampler(module, sampler_settings(cfg))
    y = torch.rand(2, 3, 8, 8)
    sampler_sigmas = geometric_sigmas(9.0, 0.01, 6)
    with torch.no_grad():
        for i in (0, 3, 5):
            torch.testing.assert_close(prior(y, i), net(y, sampler_sigmas[i].expand(2)))


# ------------------------------------------------------------------------------------------------ EMA


def _score_batches(n_batches: int, seed: int = 0):
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(seed)
    data = DigitsImages().images
    return DataLoader(TensorDataset(data[torch.randint(0, len(data), (16 * n_batches,), generator=g)]), batch_size=16)


def test_score_module_ema_is_checkpointed_restored_and_used_for_sampling(tmp_path):
    import pytorch_lightning as pl

    torch.manual_seed(0)
    sig = geometric_sigmas(1.0, 0.01, 4)
    module = ScoreModule(NCSN(1, ngf=4, sigmas=sig), sig, lr=1e-2, ema_decay=0.5)
    before = {k: v.clone() for k, v in module.net.named_parameters()}
    trainer = pl.Trainer(max_steps=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, enable_checkpointing=False)
    trainer.fit(module, train_dataloaders=_score_batches(4))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    # registered after step 1, then 3 updates: shadow = Σ over the last weights with EMA weights (decay 0.5),
    # so it differs from the raw weights (lr 1e-2 moves them) and from the initial weights
    name = "body.begin_conv.weight"
    shadow, raw = module.ema.shadow()[name], dict(module.net.named_parameters())[name]
    assert not torch.allclose(shadow, raw) and not torch.allclose(shadow, before[name])
    # in the Lightning checkpoint and in state_dict (final.pt), restored into a module built without EMA
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    torch.testing.assert_close(ckpt["state_dict"]["_extra_state"]["ema"]["shadow"][name], shadow)
    fresh = ScoreModule(NCSN(1, ngf=4, sigmas=sig), sig)
    fresh.load_state_dict(module.state_dict())
    assert fresh.ema is not None and fresh.ema.decay == 0.5
    # sampling uses the averaged weights: score == a net carrying the shadow weights
    averaged = NCSN(1, ngf=4, sigmas=sig)
    averaged.load_state_dict(module.net.state_dict())
    with torch.no_grad():
        for n, p in averaged.named_parameters():
            p.copy_(module.ema.shadow()[n])
    y = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fresh.score(y, 2), averaged(y, 2))
        assert not torch.allclose(fresh.score(y, 2), module.net(y, 2))
    pickle.loads(pickle.dumps(module))  # spawn-safe (ddp_spawn pickles the module)


def test_ncsn_gaussian_baseline_is_the_diagonal_gaussian_score_and_travels_with_the_weights():
    torch.manual_seed(0)
    sig = geometric_sigmas(1.0, 0.01, 4)
    net = NCSN(1, ngf=4, sigmas=sig, preconditioning="sigma", gaussian_baseline=True)
    with torch.no_grad():  # body output 0: the net is its baseline alone
        net.body.end_conv.weight.zero_()
        net.body.end_conv.bias.zero_()
    data = 0.2 + 0.1 * torch.randn(4000, 1, 8, 8)
    data[:, :, :2] = 0.0  # a border the data never uses (v = 0)
    with pytest.raises(RuntimeError, match="fit_baseline"):
        net(data[:2], 0)
    net.fit_baseline(data)
    y = torch.rand(5, 1, 8, 8)
    for level, s in enumerate(sig.tolist()):
        expected = -(y - data.mean(0)) / (data.var(0, correction=0) + s**2)
        torch.testing.assert_close(net(y, level), expected)
        # on the border the exact score of N(0, σ²): full restoring force, whatever the level
        torch.testing.assert_close(net(y, level)[:, :, :2], -y[:, :, :2] / s**2)
    # the statistics are buffers: a fresh net (and a score module's EMA copy) gets them from the state_dict
    module = ScoreModule(net, sig, ema_decay=0.5)
    module.ema.update_parameters(module.net)
    fresh = ScoreModule(NCSN(1, ngf=4, sigmas=sig, preconditioning="sigma", gaussian_baseline=True), sig)
    fresh.load_state_dict(module.state_dict())
    torch.testing.assert_close(fresh.score(y, 3), net(y, 3))


def test_ncsn_gaussian_preconditioning_is_edm_with_the_per_pixel_gaussian_fit():
    """preconditioning='gaussian': s = (D − y)/σ² with D = m + c_skip (y − m) + c_out F, and the DSM loss with the
    net's weight is EDM's ½‖(D(ỹ) − y)/c_out‖², both written out independently here."""
    torch.manual_seed(0)
    sig = geometric_sigmas(1.0, 0.01, 4)
    with pytest.raises(ValueError, match="gaussian_baseline"):
        NCSN(1, ngf=4, sigmas=sig, preconditioning="gaussian")
    with pytest.raises(ValueError, match="preconditioning must be one of"):
        NCSN(1, ngf=4, sigmas=sig, preconditioning="edm")
    net = NCSN(1, ngf=4, sigmas=sig, preconditioning="gaussian", gaussian_baseline=True)
    data = 0.2 + 0.1 * torch.randn(2000, 1, 8, 8)
    data[:, :, :2] = 0.0  # a border the data never uses (v = 0 -> v_d = (σ_L/10)²)
    with pytest.raises(RuntimeError, match="fit_baseline"):
        net(data[:2], 0)
    net.fit_baseline(data)
    m, v_d = data.mean(0), data.var(0, correction=0) + 0.001**2
    y = data[:6]
    labels = torch.tensor([0, 1, 2, 3, 3, 0])
    s_b = sig[labels].view(-1, 1, 1, 1)
    ynoisy = y + s_b * torch.randn_like(y)
    with torch.no_grad():
        f = net.body(2 * ynoisy - 1, labels)
        c_skip, c_out = v_d / (v_d + s_b**2), s_b * (v_d / (v_d + s_b**2)).sqrt()
        denoised = m + c_skip * (ynoisy - m) + c_out * f
        torch.testing.assert_close(net(ynoisy, labels), (denoised - ynoisy) / s_b**2, rtol=1e-4, atol=1e-4)
        gen = torch.Generator().manual_seed(3)
        loss = dsm_loss(net, y, sig, labels=labels, generator=gen)
        gen = torch.Generator().manual_seed(3)
        z = torch.randn(y.shape, generator=gen)
        yz = y + s_b * z
        d = m + c_skip * (yz - m) + c_out * net.body(2 * yz - 1, labels)
        edm = (0.5 * ((d - y) / c_out).pow(2).flatten(1).sum(1)).mean()
        torch.testing.assert_close(loss, edm, rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError, match="anneal_power"):
            dsm_loss(net, y, sig, anneal_power=1.0)


class _ZeroScore(nn.Module):
    def forward(self, y, sigma):
        return torch.zeros_like(y)


@pytest.mark.parametrize("power", [2.0, 1.0])
def test_score_module_dsm_weight_sigma_power(power):
    # a score of 0 leaves the whole target z/σ: loss = ½ σ^p ‖z/σ‖², E = ½ D · mean_l σ_l^(p−2) over uniform levels
    sig = geometric_sigmas(1.0, 0.01, 4)
    module = ScoreModule(_ZeroScore(), sig, anneal_power=power)
    torch.manual_seed(0)
    n, d = 20000, 16
    loss = float(module.loss(torch.zeros(n, 1, 4, 4))[0])
    m1, m2 = float(sig.pow(power - 2).mean()), float(sig.pow(2 * (power - 2)).mean())
    expected = 0.5 * d * m1
    sd = math.sqrt(0.25 * m2 * d * (d + 2) - expected**2)  # ‖z‖² ~ χ²_d: E = d, E[·²] = d(d + 2)
    assert loss == pytest.approx(expected, abs=5 * sd / math.sqrt(n))


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_score_module_lr_schedule(tmp_path, schedule):
    import pytorch_lightning as pl

    sig = geometric_sigmas(1.0, 0.01, 4)
    module = ScoreModule(NCSN(1, ngf=4, sigmas=sig), sig, lr=1e-3, lr_schedule=schedule)
    trainer = pl.Trainer(max_steps=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, enable_checkpointing=False)
    trainer.fit(module, train_dataloaders=_score_batches(4))
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == (1e-3 if schedule == "constant" else pytest.approx(0.0, abs=1e-12))
    with pytest.raises(ValueError, match="score.lr_schedule"):
        ScoreModule(NCSN(1, ngf=4, sigmas=sig), sig, lr_schedule="linear")


def test_background_statistic():
    target = torch.zeros(3, 1, 4, 4)
    target[:, :, 1:3, 1:3] = 1.0
    target[0, 0, 0, 0] = 0.02  # mean 0.0067 < 0.01: still background
    mask = images.background_mask(target)
    assert int(mask.sum()) == 12 and not bool(mask[1:3, 1:3].any())
    y = torch.zeros(2, 1, 4, 4)
    y[0][:, mask] = 0.1
    y[1][:, mask] = -0.3
    y[:, :, 1:3, 1:3] = 5.0  # foreground values do not count
    b = images.background_stats(y, mask)
    assert b["abs"] == pytest.approx(0.2) and b["signed"] == pytest.approx(-0.1)
    assert b["rms"] == pytest.approx(math.sqrt((0.01 + 0.09) / 2))


# ------------------------------------------------------------------------------------------------ grids / metrics


def test_comparison_grid_layout_and_pixels(tmp_path):
    x = torch.zeros(3, 1, 8, 8)
    y = torch.full((3, 2, 1, 8, 8), 0.5)
    y_bp = torch.ones(3, 1, 8, 8)
    x[1, 0, 2, 3] = 1.0
    images.save_comparison_grid(tmp_path / "g.png", x, y, y_bp)
    with Image.open(tmp_path / "g.png") as im:
        a = np.asarray(im.convert("L"), dtype=np.float64) / 255
    cell = 2 + 8 * 6  # padding + 8 px enlarged 6x (nearest) to >= 48 px
    assert a.shape == (3 * cell + 2, 4 * cell + 2)

    def tile(r, c):  # the enlarged image at row r, column c of the grid
        return a[2 + r * cell : 2 + r * cell + 48, 2 + c * cell : 2 + c * cell + 48]

    assert tile(0, 0).max() == 0 and abs(tile(2, 1).mean() - 128 / 255) < 1e-9 and tile(1, 3).min() == 1
    assert tile(1, 0)[12:18, 18:24].min() == 1 and tile(1, 0).sum() == 36  # the bright source pixel, 6x6


class _GaussianScoreModule(nn.Module):
    """Stands in for ScoreModule: exact score of N(m, s²I) * N(0, σ²I), i.e. −(y − m)/(s² + σ²)."""

    def __init__(self, m: float, s: float) -> None:
        super().__init__()
        self.m, self.s2 = m, s * s
        self.register_buffer("sigmas", geometric_sigmas(1.0, 0.01, 10))

    def score(self, y, level):
        return -(y - self.m) / (self.s2 + float(self.sigmas[level]) ** 2)


def test_score_sample_grid_samples_the_model_and_writes_png(tmp_path):
    cb = images.ScoreSampleGrid(tmp_path, (1, 4, 4), every_n_steps=5, n_samples=500, step_lr=1e-4, n_steps_each=30)
    y = cb.sample(_GaussianScoreModule(0.3, 0.1))
    # annealed Langevin from U[0, 1] down to σ_L = 0.01, then a denoising step: N(0.3, 0.1²) per pixel
    assert float(y.mean()) == pytest.approx(0.3, abs=0.005) and float(y.std()) == pytest.approx(0.1, rel=0.05)

    class _Trainer:
        is_global_zero, global_step = True, 10

    cb.n = 4
    cb.on_train_batch_end(_Trainer(), _GaussianScoreModule(0.3, 0.1), None, None, 0)
    assert (tmp_path / "step000010.png").exists()


def test_compared_sets_are_drawn_without_the_feature_fid_reference_images():
    """The independent samples and the resample pool come from the target set minus the classifier's held-out
    images, the feature-FID reference: a copied reference image would get a distance below the floor."""
    from types import SimpleNamespace

    target = DigitsImages(subset="odd")
    s = SimpleNamespace(enabled=True, holdout=0.2)
    hold, rest = images.heldout_split(s, 7, len(target))
    assert len(hold) == round(0.2 * len(target))
    assert sorted(torch.cat([hold, rest]).tolist()) == list(range(len(target)))
    drawn = images.without_reference(s, 7, target)
    flat = lambda t: {tuple(r) for r in t.flatten(1).tolist()}  # noqa: E731
    assert flat(drawn.sample(5000, generator=torch.Generator().manual_seed(0))) <= flat(target.images[rest])
    assert not flat(drawn.images) & (flat(target.images[hold]) - flat(target.images[rest]))
    assert images.without_reference(SimpleNamespace(enabled=False, holdout=0.2), 7, target) is target


def test_label_consistency_identity_and_shuffled_against_chance(tmp_path):
    cfg = make_cfg(tmp_path, ["+experiment=digits", "eval.label_consistency.epochs=5"])
    target = DigitsImages(subset="odd")
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(target), (600,), generator=g)
    x, labels = target.images[idx], target.labels[idx]
    ys = {"same": x, "shuffled": x[torch.randperm(600, generator=g)]}
    spec = read_run(cfg)
    out = images.label_consistency_scores(spec.eval.settings.label_consistency, spec.seed, target, x, labels, ys)
    # the classifier (≈ 97 % on held-out digits) labels the images themselves; shuffled pairs are at chance
    # (Σ_k p_k² ≈ 0.1 for 10 balanced classes; 600 pairs: standard error ≈ 0.012)
    assert out["heldout_accuracy"] > 0.85 and out["methods"]["same"] > 0.9
    assert abs(out["methods"]["shuffled"] - 0.1) < 0.05
    assert out["source_accuracy"] == out["methods"]["same"] and out["n_train"] == len(target) - round(0.2 * 898)


# ------------------------------------------------------------------------------------------------ slow


@pytest.mark.slow
def test_digits_default_end_to_end_on_real_data(tmp_path):
    cfg = make_cfg(tmp_path, ["+experiment=digits", "num_threads=1"])
    m = run(cfg, tmp_path / "run")
    lc = {k: v["label_consistency"] for k, v in m["methods"].items()}
    assert lc["scones"] >= 0.93, lc  # docs/images.md: 0.954-0.966 over 3 seeds (0.966 at the default seed)
    assert abs(lc["independent"] - 0.1) < 0.06, lc  # chance level
    assert m["label_classifier"]["heldout_accuracy"] > 0.9
    assert m["fid"]["skipped"] is None or m["fid"]["scones"] is None
    # offline image quality: SCONES samples within 2x of the target-vs-target floor (docs/images.md: 1.04x)
    ffid = m["feature_fid"]["fid"]
    assert ffid["scones"] < 2 * ffid["target_floor"] and ffid["source"] > 2 * ffid["target_floor"], ffid
    assert ffid["scones"] <= ffid["bp"], ffid  # real digits beat conditional means (default seed: 67.1 vs 69.4)
    # clean background (docs/images.md point 6): mean |y| on the 30 pixels the targets leave black, SCONES 0.006
    # (target images 0.002); chains from BP(x) + σ z without the score's Gaussian baseline had 0.027
    assert m["methods"]["scones"]["background"] < 0.01 and m["background"]["pixels"] == 30, m["background"]
    buf = io.BytesIO((tmp_path / "run" / "samples_grid.png").read_bytes())
    assert Image.open(buf).size[0] > 0


def test_score_expert_replaces_the_net_at_its_levels_outside_the_stage_key(tmp_path):
    """score.expert: the fitted mixture's exact convolved score at σ ≥ sigma_min, the net below; fitted again when
    the stage is loaded (same score), not part of the stage key; too many components for the data is a
    ConfigError naming the key."""
    from experiments import pipeline
    from experiments.stages import make_stage
    from scones.models.score import MixtureExpert

    on = ["++score.expert.components=3", "++score.expert.sigma_min=0.3"]
    cfg = _digits_cfg(tmp_path, *on)
    spec, off = read_run(cfg), read_run(_digits_cfg(tmp_path))
    assert make_stage(spec.training, spec.score).key == make_stage(off.training, off.score).key
    target = DigitsImages(size=16, subset="odd")
    prior, stage = pipeline.score_stage(spec, target)
    module = prior.module
    assert isinstance(module.expert, MixtureExpert) and len(module.expert.mixture.weights64) == 3
    sig = module.sigmas  # 4 levels 1 → 0.01: 1, 0.215, 0.046, 0.01
    y = torch.rand(5, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(prior(y, 0), module.expert.mixture.convolved(float(sig[0])).score(y))
        torch.testing.assert_close(prior(y, 1), module.sampling_net()(y, sig[1].expand(5)))
    again, cached = pipeline.score_stage(spec, target)  # loaded from the cache: the same expert, refitted
    assert cached.cached
    with torch.no_grad():
        torch.testing.assert_close(again(y, 0), prior(y, 0))
    with pytest.raises(ConfigError, match=r"score\.expert\.components=5000 .* set score\.expert\.components=0"):
        pipeline.score_stage(read_run(_digits_cfg(tmp_path, "++score.expert.components=5000")), target)
