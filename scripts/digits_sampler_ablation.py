"""Where does the speckle of SCONES digit samples come from? Sampler ablation on the cached `digits` stages.

Loads (or trains, once) the dual, score and BP stages of ``+experiment=digits`` through the stage cache, trains the
evaluation's digit CNN once, then runs sampler variants on the same sources and reports for each:

* ``bg``: mean |y| on background pixels (pixels where the target set's mean image is < 0.01; target images
  themselves: ~0.002) — the speckle statistic; ``bg_rms`` the root-mean-square there;
* ``ffid`` / ``fkid``: feature FID / KID against held-out target images (:mod:`scones.metrics.feature_distance`;
  floor printed first);
* ``lc``: label consistency (conditional variants only);
* the score model's denoising ratio per level, ‖D(y + σz) − y‖ / ‖σz‖ with the Tweedie denoiser D(ỹ) = ỹ + σ² s(ỹ, σ)
  on target images (1 = the score does nothing at that level, 0 = perfect denoiser).

    python scripts/digits_sampler_ablation.py                          # cached stages of the default digits run
    python scripts/digits_sampler_ablation.py --variants base no_denoise --n 500 -- score.ema_decay=0.999

Everything after ``--`` is a Hydra override of the digits experiment (it must match the run whose stages are
cached, or those stages are trained first). Grids of each variant go to ``--out`` (default outputs/ablation).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments import images  # noqa: E402
from experiments import pipeline as P  # noqa: E402
from scones.metrics.classifier import label_consistency  # noqa: E402
from scones.metrics.feature_distance import PenultimateFeatures, feature_distances  # noqa: E402
from scones.sampling.conditional import ConditionalScore  # noqa: E402
from scones.sampling.langevin import annealed_langevin  # noqa: E402

# name -> sampler keys (step_lr, n_steps_each, skip_levels, denoise, guidance) overridden, plus 'drop_last' (stop at
# level L-1, same step sizes) and init='uniform' (unconditional chains from U[0,1] over the whole schedule)
VARIANTS: dict[str, dict] = {
    "base": {},
    "no_denoise": {"denoise": False},
    "drop_last_level": {"drop_last": True},
    "guidance0": {"guidance": 0.0},
    "steps1": {"n_steps_each": 1},
    "steps3": {"n_steps_each": 3},
    "steps30": {"n_steps_each": 30},
    "steps100": {"n_steps_each": 100},
    "skip5": {"skip_levels": 5},
    "skip7": {"skip_levels": 7},
    "skip8": {"skip_levels": 8},
    "skip9": {"skip_levels": 9},
    "lr1e-5": {"step_lr": 1e-5},
    "lr2e-5": {"step_lr": 2e-5},
    "lr1e-4": {"step_lr": 1e-4},
    "bp_only_denoise": {"skip_levels": 10},  # no Langevin step: y0 = BP + sigma_L z, then the denoise step
    "raw_weights": {"raw": True},  # the trained weights instead of their EMA (score.ema_decay set)
    "uncond": {"init": "uniform", "skip_levels": 0, "guidance": 0.0},
    "uncond_steps30": {"init": "uniform", "skip_levels": 0, "guidance": 0.0, "n_steps_each": 30},
    # the final steps (custom loop below; "loop_base" = the default through that loop, must equal "base")
    "loop_base": {"loop": True},
    "denoise_prior_only": {"loop": True, "denoise_guidance": 0.0},
    "last_level_guidance0": {"loop": True, "last_guidance": 0.0, "denoise_guidance": 0.0},
    "guidance_anneal": {"loop": True, "guidance_schedule": "sigma2"},
    "last_steps30": {"loop": True, "last_steps": 30},
    "last_steps100": {"loop": True, "last_steps": 100},
    "last_lr_x0.2": {"loop": True, "last_lr_factor": 0.2},
    "noise_free_last": {"loop": True, "last_noise": 0.0},
    "noise_free_final5": {"loop": True, "final_noise_free": 5},
    "denoise_at_sigma9": {"loop": True, "denoise_level": -2},
    "denoise_at_sigma8": {"loop": True, "denoise_level": -3},
    "denoise_twice": {"loop": True, "denoise_times": 2},
    "skip8_last_steps30": {"loop": True, "skip_levels": 8, "last_steps": 30},
    "skip8_steps20": {"skip_levels": 8, "n_steps_each": 20},
    # chains started at target samples resampled with H(x, .) (sampler.init=resample), then the last level(s)
    "resample_skip9": {"init": "resample", "skip_levels": 9},
    "resample_skip8": {"init": "resample", "skip_levels": 8},
    # the same with the whole target set as pool, feature-FID reference images included
    "resample_skip9_allpool": {"init": "resample", "skip_levels": 9, "pool": "all"},
}


RESAMPLE_POOL: dict = {}  # the target samples init=resample reweights (set in main, seed 0 as in Coupling)


def start_digits_job(overrides: list[str]):
    """``+experiment=digits num_threads=1 <overrides>`` composed and started as experiments.run starts a job
    (:func:`experiments.startup.start_job`), so the stage keys are the run's (cache reuse). Returns
    ``(cfg, problem, spec)``; shared with scripts/digits_score_ablation.py."""
    from experiments.run import compose_config
    from experiments.startup import start_job

    cfg = compose_config(["+experiment=digits", "num_threads=1", *overrides], ROOT / "configs")
    problem, spec, _ = start_job(cfg)
    return cfg, problem, spec


@torch.no_grad()
def denoise_ratios(module, images_: torch.Tensor, sigmas: torch.Tensor, seed: int = 0) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, s in enumerate(sigmas.tolist()):
        z = torch.randn(images_.shape, generator=g)
        noisy = images_ + s * z
        den = noisy + s**2 * module.score(noisy, i)
        out.append(float((den - images_).flatten(1).norm(dim=1).mean() / (s * z.flatten(1).norm(dim=1)).mean()))
    return out


@torch.no_grad()
def annealed_loop(score, y, sigmas, step_lr, n_steps_each, skip, spec, g) -> torch.Tensor:
    """annealed_langevin with knobs on the final steps (same random draws as it when no knob is set)."""
    L = len(sigmas)
    alphas = (step_lr * (sigmas / sigmas[-1]) ** 2).tolist()
    s0 = float(sigmas[skip])

    def guided(yy, i, w):
        if w == 1.0:
            return score(yy, i)
        prior = score.prior_score(yy, i)
        return prior if w == 0.0 else prior + w * (score(yy, i) - prior)

    for i in range(skip, L):
        last = i == L - 1
        n = int(spec.get("last_steps", n_steps_each)) if last else n_steps_each
        a = alphas[i] * (float(spec.get("last_lr_factor", 1.0)) if last else 1.0)
        w = float(spec.get("last_guidance", 1.0)) if last else 1.0
        if spec.get("guidance_schedule") == "sigma2":
            w = float(sigmas[i]) ** 2 / s0**2
        noise = float(spec.get("last_noise", 1.0)) if last else 1.0
        for _ in range(n):
            z = torch.randn(y.shape, generator=g)
            y = y + a * guided(y, i, w) + noise * (2.0 * a) ** 0.5 * z
    for _ in range(int(spec.get("final_noise_free", 0))):
        y = y + alphas[-1] * guided(y, L - 1, 1.0)
    for _ in range(int(spec.get("denoise_times", 1))):
        k = L + int(spec.get("denoise_level", -1))
        y = y + float(sigmas[k]) ** 2 * guided(y, k, float(spec.get("denoise_guidance", 1.0)))
    return y


def run_variant(spec: dict, cfg, module, potentials, x, y_bp, g) -> torch.Tensor:
    s = {**{k: cfg.sampler[k] for k in ("step_lr", "n_steps_each", "skip_levels", "denoise")}, **spec}
    sigmas = module.sigmas.detach().clone()
    skip = int(s["skip_levels"])
    if spec.get("init") == "uniform":
        y0 = torch.rand(x.shape, generator=g)
    elif spec.get("init") == "resample":
        pool = RESAMPLE_POOL[spec.get("pool", "pool")]
        y0 = P.conditional.resampled_chains(potentials, x, pool, g)[0]
    else:
        first = float(sigmas[min(skip, len(sigmas) - 1)])
        y0 = y_bp + first * torch.randn(x.shape, generator=g)
    ema = module.ema
    if spec.get("raw"):
        module.ema = None  # ScoreModule.score then uses the trained weights
    prior = P.conditional.LearnedPriorScore(module)  # level index -> training schedule
    n_levels = len(sigmas) - (1 if spec.get("drop_last") else 0)
    score = ConditionalScore(prior, potentials, x, guidance=float(spec.get("guidance", cfg.sampler.guidance)))
    # same step sizes alpha_i = eps sigma_i^2 / sigma_L^2 when the last level is dropped (then the denoise step
    # uses the last level run, sigma_{L-1})
    step_lr = float(s["step_lr"]) * float(sigmas[n_levels - 1] / sigmas[-1]) ** 2
    try:
        if spec.get("loop"):
            return annealed_loop(score, y0, sigmas, step_lr, int(s["n_steps_each"]), skip, spec, g)
        return annealed_langevin(
            score, y0, sigmas[:n_levels], step_lr, int(s["n_steps_each"]), denoise=bool(s["denoise"]),
            skip_levels=min(skip, n_levels), disable=True, generator=g,
        )
    finally:
        module.ema = ema


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "ablation")
    ap.add_argument("--json", type=Path, default=None, help="append one JSON line per variant here")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg, problem, spec = start_digits_job(args.overrides)
    source, target, cost, regularizer = problem
    potentials, dual = P.dual_stage(spec, problem)
    prior_score, _ = P.score_stage(spec, target)
    bp_net, _ = P.bp_stage(spec, problem, potentials, dual)
    module = prior_score.module
    module.eval()
    trained = images.train_label_classifier(spec.eval.settings.label_consistency, spec.seed, target)
    feats = PenultimateFeatures(trained["classifier"])
    bg_mask = images.background_mask(target.images)
    pool_size = int(cfg.sampler.get("pool_size", 10000))
    # as the evaluation: target images without the feature-FID reference ones (the classifier's held-out images);
    # "all": the whole target set, reference images included (a copied reference image beats the floor)
    drawn = images.without_reference(spec.eval.settings.label_consistency, spec.seed, target)
    RESAMPLE_POOL["pool"] = drawn.sample(pool_size, generator=torch.Generator().manual_seed(0))
    RESAMPLE_POOL["all"] = target.sample(pool_size, generator=torch.Generator().manual_seed(0))

    def bg(y: torch.Tensor) -> tuple[float, float, float]:
        b = images.background_stats(y, bg_mask)
        return b["abs"], b["rms"], b["signed"]

    g = torch.Generator().manual_seed(int(cfg.seed) + 100)
    x, x_labels = images.sample_with_labels(source, args.n, g)
    with torch.no_grad():
        y_bp = bp_net(x).reshape(x.shape)
    y_ind = drawn.sample(args.n, generator=g)
    ratios = denoise_ratios(module, target.images[:256], module.sigmas)
    print("sigmas        ", " ".join(f"{s:.4f}" for s in module.sigmas.tolist()))
    print("denoise ratio ", " ".join(f"{r:.3f}" for r in ratios), flush=True)
    ref = {"bp": y_bp, "independent": y_ind, "source": x}
    fd = feature_distances(feats, trained["heldout_images"], ref, seed=int(cfg.seed) + 400)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, y in ref.items():
        rows.append({"variant": name, "bg": bg(y)[0], "bg_rms": bg(y)[1], "ffid": fd["fid"][name],
                     "fkid": fd["kid"][name]["mean"], "lc": label_consistency(trained["classifier"], y.clamp(0, 1),
                                                                            x_labels)})
    rows.append({"variant": "target_floor", "bg": bg(target.images)[0], "bg_rms": bg(target.images)[1],
                 "ffid": fd["fid"]["target_floor"], "fkid": fd["kid"]["target_floor"]["mean"], "lc": None})
    for r in rows:
        print(json.dumps(r), flush=True)
    for name in args.variants:
        t0 = time.process_time()
        gv = torch.Generator().manual_seed(int(cfg.seed) + 500)
        y = run_variant(VARIANTS[name], cfg, module, potentials, x, y_bp, gv)
        cpu = time.process_time() - t0
        d = feature_distances(feats, trained["heldout_images"], {"y": y}, seed=int(cfg.seed) + 400)
        row = {"variant": name, "bg": bg(y)[0], "bg_rms": bg(y)[1], "bg_signed": bg(y)[2], "ffid": d["fid"]["y"],
               "fkid": d["kid"]["y"]["mean"], "lc": label_consistency(trained["classifier"], y.clamp(0, 1), x_labels),
               "out_of_range": float(((y < -0.05) | (y > 1.05)).float().mean()), "cpu_s": round(cpu, 1)}
        print(json.dumps(row), flush=True)
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps({**row, "overrides": args.overrides}) + "\n")
        k = min(10, x.shape[0])  # the grid: up to 10 sources
        (args.out / f"{name}.png").write_bytes(images.grid_png(
            torch.cat([x[:k, None], y[:k, None], y_bp[:k, None]], 1).reshape(3 * k, *x.shape[1:]), nrow=6))
    print("n_per_set", fd["n_per_set"], "n_reference", fd["n_reference"], "features", fd["features"])


if __name__ == "__main__":
    main()
