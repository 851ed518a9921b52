"""The Coupling object: sampling and densities against the closed-form Gaussian plan, and loading a real run."""

import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize

from experiments.density import GaussianPlan, calibration
from experiments.evaluation import gaussian_truth
from experiments.loading import RunDirError, load_coupling
from experiments.pipeline import run
from experiments.run import register_resolvers
from scones.coupling import Coupling
from scones.data import RandomGaussian, SwissRoll
from scones.metrics.bw_uvp import bw_uvp, bw_uvp_samples
from scones.ot import KL, SquaredEuclidean
from scones.ot.gaussian import entropic_conditional, entropic_joint_covariance, exact_gaussian_potentials

LAM = 4.0


class ExactPotentials:
    """Closed-form (φ, ψ) of the entropic plan, with the constant that makes E_{p⊗q}[H] = 1.

    log π* − log p − log q = (φ + ψ − c)/λ exactly when φ carries + λ·MI, MI = ½ log(det A det B / det Σ*)
    (the quadratic parts agree by construction of the potentials).
    """

    def __init__(self, a, b, lam, shift=0.0):
        self.f, self.g = exact_gaussian_potentials(a, b, lam)
        sigma = entropic_joint_covariance(a, b, lam)
        mi = 0.5 * (np.linalg.slogdet(a)[1] + np.linalg.slogdet(b)[1] - np.linalg.slogdet(sigma)[1])
        self.const = lam * (mi + shift)
        self.cost, self.regularizer = SquaredEuclidean("sum"), KL(lam)

    def phi(self, x):
        return self.f(x) + self.const

    def psi(self, y):
        return self.g(y)


@pytest.fixture
def pair():
    return RandomGaussian(2, role="source"), RandomGaussian(2, role="target")


def exact_coupling(source, target, lam=LAM, **kw):
    cond = entropic_conditional(source.cov_np, target.cov_np, lam)
    m = torch.as_tensor(cond.M, dtype=torch.float32)
    return Coupling(
        ExactPotentials(source.cov_np, target.cov_np, lam), source, target,
        prior_score=lambda y, level: target.score(y), barycentric_map=lambda x: x @ m.T, **kw,
    ), cond


def test_log_density_is_the_closed_form_plan_density(pair):
    source, target = pair
    coupling, _ = exact_coupling(source, target)
    plan = GaussianPlan.from_truth(gaussian_truth(source, target, KL(LAM), SquaredEuclidean("sum")))
    g = torch.Generator().manual_seed(0)
    x, y = source.sample(500, generator=g), target.sample(500, generator=g)  # points off and on the plan's bulk
    exact = plan.log_prob(x, y)
    raw = coupling.log_density(x, y, normalized=False)
    assert torch.allclose(raw, exact, atol=2e-3 * exact.abs().max().item())
    # normalised: minus log Z, Z = E_{p⊗q}[H] = 1 up to Monte-Carlo error on 2000² pairs
    shift = raw - coupling.log_density(x, y)
    assert float(shift.max() - shift.min()) < 1e-9 and abs(float(shift[0])) < 0.05
    assert coupling.lam == LAM and coupling.settings()["regularizer"] == "kl"


def test_log_density_without_known_marginal_densities_is_normalised_log_h():
    source = RandomGaussian(2, role="source")
    target = SwissRoll()  # no log_prob: the density is w.r.t. p⊗q
    pot = ExactPotentials(source.cov_np, np.eye(2), LAM)
    coupling = Coupling(pot, source, target, n_normalizer=500)
    x, y = source.sample(10), target.sample(10)
    assert not coupling.has_density
    with pytest.warns(UserWarning, match="w.r.t. p⊗q"):
        out = coupling.log_density(x, y)
    expected = coupling.log_compatibility(x, y).double() - coupling.log_normalizer()
    assert torch.allclose(out, expected)


def test_sample_matches_closed_form_conditional(pair):
    """n samples per source from exact potentials + exact score: moments of π*(y | x) (ULA bias ≲ h)."""
    source, target = pair
    sampler = {"kind": "ula", "step_size": 0.02, "n_steps": 600, "init": "bp", "init_noise": 1.0}
    coupling, cond = exact_coupling(source, target, sampler=sampler, batch_size=4096)
    x = source.sample(4, generator=torch.Generator().manual_seed(1))
    n = 2000
    y = coupling.sample(x, n, generator=torch.Generator().manual_seed(2))
    assert y.shape == (4, n, 2)
    s_diag = np.diag(cond.S)
    for i in range(4):
        yi = y[i].double().numpy()
        # mean: 5 standard errors; covariance: ULA step h = 0.02 inflates S by O(h·eig) ≈ 1 %, plus 5 % noise
        assert np.all(np.abs(yi.mean(0) - cond.mean(x[i : i + 1].numpy())[0]) < 5 * np.sqrt(s_diag / n))
        np.testing.assert_allclose(np.cov(yi, rowvar=False), cond.S, rtol=0.12, atol=0.12 * s_diag.max())


def test_sample_checks_inputs(pair):
    source, target = pair
    coupling, _ = exact_coupling(source, target, sampler={"kind": "ula", "step_size": 0.1, "n_steps": 1, "init": "bp"})
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        coupling.sample(torch.zeros(3, 5))
    no_sampler, _ = exact_coupling(source, target)
    with pytest.raises(ValueError, match="sampler"):
        no_sampler.sample(torch.zeros(3, 2))


# --------------------------------------------------------------------------------------------- a real run

FAST = [
    "+experiment=density_gaussian",
    "data.dim=2",
    "++dual.steps=200",
    "++dual.batch_size=256",
    "++dual.net.hidden=[64,64]",
    "++bp.steps=100",
    "++bp.batch_size=256",
    "++bp.net.hidden=[64,64]",
    "++eval.n_samples=500",
    "++eval.batch_size=500",
    "++sampler.n_steps=300",
    "++eval.density.n_pairs=500",
    "++eval.density.n_kl=2000",
    "++eval.density.grid=30",
    "num_threads=1",
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("coupling_run")
    register_resolvers()
    with initialize(version_base="1.3", config_path="../configs"):
        cfg = compose(config_name="config", overrides=[*FAST, f"paths.output_root={root}"])
    run_dir = root / "run"
    metrics = run(cfg, run_dir)
    return cfg, run_dir, metrics


def test_load_coupling_reloads_the_trained_networks(finished_run):
    cfg, run_dir, metrics = finished_run
    coupling = load_coupling(run_dir)
    assert coupling.lam == 2 * 2 and coupling.cost.reduction == "sum" and coupling.sampler.kind == "ula"
    saved = np.load(run_dir / "samples.npz")
    # BP network: same outputs as the run's own evaluate stage
    np.testing.assert_allclose(coupling.barycentric(saved["x"]).numpy(), saved["y_bp"], rtol=1e-5, atol=1e-5)
    # dual potentials: the density section's E_{p⊗q}[H] is reproduced on the same draws
    again = calibration(coupling, int(cfg.eval.density.n_pairs), torch.Generator().manual_seed(int(cfg.seed) + 200))
    assert again["mean_H"] == pytest.approx(metrics["density"]["mean_H"], rel=1e-6)
    assert json.loads((run_dir / "metrics.json").read_text())["density"]["kl"] == pytest.approx(
        metrics["density"]["kl"]
    )
    assert (run_dir / "density_slice.png").exists()


def test_load_coupling_samples_the_learned_plan(finished_run):
    """Samples of the loaded plan are far closer to π* than the independent coupling (closed-form BW-UVP)."""
    _, run_dir, _ = finished_run
    coupling = load_coupling(run_dir)
    a, b = coupling.source.cov_np, coupling.target.cov_np
    sigma = entropic_joint_covariance(a, b, coupling.lam)
    independent = bw_uvp(np.block([[a, np.zeros_like(a)], [np.zeros_like(b), b]]), sigma)
    x = coupling.source.sample(500, generator=torch.Generator().manual_seed(5))
    y = coupling.sample(x, n=2, generator=torch.Generator().manual_seed(6))
    assert y.shape == (500, 2, 2)
    joint = np.hstack([x.repeat_interleave(2, 0).numpy(), y.reshape(-1, 2).numpy()])
    assert bw_uvp_samples(joint, sigma) < 0.1 * independent


def test_loaded_plan_draws_the_run_samples(finished_run):
    """One sampling path: the evaluate stage samples through the Coupling a user loads, so the loaded plan given the
    evaluate stage's generator (seed + 100) draws the run's own samples, bit for bit."""
    cfg, run_dir, _ = finished_run
    coupling = load_coupling(run_dir)
    g = torch.Generator().manual_seed(int(cfg.seed) + 100)
    x = coupling.source.sample(int(cfg.eval.n_samples), generator=g)
    y = coupling.sample(x, generator=g)[:, 0]
    saved = np.load(run_dir / "samples.npz")
    np.testing.assert_array_equal(x.numpy(), saved["x"])
    np.testing.assert_array_equal(y.numpy(), saved["y"])


def test_load_coupling_errors_name_the_problem(tmp_path, finished_run):
    with pytest.raises(RunDirError, match="config.yaml"):
        load_coupling(tmp_path)
    _, run_dir, _ = finished_run
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["stages"]["dual"]["dir"] = str(tmp_path / "gone" / "dual-000")
    (broken / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(RunDirError, match="stage 'dual'.*not found"):
        load_coupling(broken)
