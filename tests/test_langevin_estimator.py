"""The dual's ``langevin`` estimator (semi-dual gradient from conditional Langevin chains) against the closed form."""

import numpy as np
import torch

from scones.data import RandomGaussian
from scones.nets.mlp import Potential
from scones.ot import KL, SquaredEuclidean
from scones.ot.dual import DualPotentials, dual_objective, semidual_langevin_losses
from scones.ot.gaussian import entropic_potentials
from scones.sampling.chains import ConditionalChains
from scones.sampling.conditional import ExactPriorScore


def _quadratic_pair(dim, lam, Qs=None):
    pots = [Potential(dim, hidden=[], quadratic=True, quadratic_scale=1.0) for _ in range(2)]
    if Qs is not None:
        with torch.no_grad():
            for p, Q in zip(pots, Qs, strict=True):
                p.quad.copy_(torch.as_tensor(Q, dtype=torch.float32))
                p.net[-1].weight.zero_()
    return DualPotentials(pots[0], pots[1], SquaredEuclidean(), KL(lam))


def _chain_start(pot, x):
    xg = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(pot.phi(xg).sum(), xg)
    return (x - g / 2).detach()


def test_langevin_estimator_learns_the_closed_form_potentials_of_a_sharp_plan():
    """d = 4, λ = 0.25 (a sharp plan): quadratic potentials trained by the chains' semi-dual gradient reach the
    closed-form ψ and φ (quadratic forms within 0.1 in spectral norm, from 0 at the start, |Q| ≈ 1)."""
    torch.manual_seed(0)
    dim, lam, n = 4, 0.25, 256
    src, tgt = RandomGaussian(dim, role="source"), RandomGaussian(dim, role="target")
    Qf, Qg = entropic_potentials(src.cov_np, tgt.cov_np, lam)
    pot = _quadratic_pair(dim, lam)
    h = 0.05 / (1 / np.linalg.eigvalsh(tgt.cov_np).min() + 2 / lam)
    chains = ConditionalChains(n, (dim,), h, steps_per_update=5, burn_in=40, seed=1)
    score = ExactPriorScore(tgt)
    opt = torch.optim.Adam(pot.parameters(), lr=0.02)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 400)
    g = torch.Generator().manual_seed(2)
    for _ in range(400):
        x, y = src.sample(n, generator=g), tgt.sample(n, generator=g)
        usable = chains.update(pot, score, x, lambda z: _chain_start(pot, z))
        lp, lf, _ = semidual_langevin_losses(pot, chains.x[usable], chains.y[usable], y)
        opt.zero_grad()
        (lp + lf).backward()
        opt.step()
        sched.step()
    learned = [(0.5 * (p.quad + p.quad.T)).detach().double().numpy() for p in (pot.phi, pot.psi)]
    assert np.linalg.norm(learned[1] - Qg, 2) < 0.1, np.linalg.norm(learned[1] - Qg, 2)
    assert np.linalg.norm(learned[0] - Qf, 2) < 0.1, np.linalg.norm(learned[0] - Qf, 2)

    assert min(np.linalg.norm(Qg, 2), np.linalg.norm(Qf, 2)) > 0.3  # the start (0) is far from both


def test_exact_potentials_are_a_fixed_point_of_the_langevin_estimator_not_of_weighted_pairs():
    """At d = 16, λ = 0.25 (no pair of a batch is a plan pair) the weighted-pairs gradient at the exact potentials is
    large, the chains' gradient (exact conditional samples stand in for converged chains) is at its noise."""
    torch.manual_seed(0)
    dim, lam, n = 16, 0.25, 500
    src, tgt = RandomGaussian(dim, role="source"), RandomGaussian(dim, role="target")
    pot = _quadratic_pair(dim, lam, entropic_potentials(src.cov_np, tgt.cov_np, lam))
    from scones.ot.gaussian import entropic_conditional

    cond = entropic_conditional(src.cov_np, tgt.cov_np, lam)
    g = torch.Generator().manual_seed(3)

    def grad_norm(loss):
        pot.zero_grad()
        loss.backward()
        return float(pot.psi.quad.grad.norm())

    pairs, chains = [], []
    for i in range(4):
        x, y = src.sample(n, generator=g), tgt.sample(n, generator=g)
        pairs.append(grad_norm(-dual_objective(pot, x, y, "all", "logmeanexp")[0]))
        y_plan = torch.as_tensor(cond.sample(x.double().numpy(), np.random.default_rng(i)), dtype=torch.float32)
        chains.append(grad_norm(semidual_langevin_losses(pot, x, y_plan, y)[0]))
    assert np.mean(pairs) > 5 * np.mean(chains), (pairs, chains)


def test_pipeline_runs_the_langevin_estimator_and_rejects_it_without_kl(tmp_path):
    """``dual.estimator=langevin`` end to end at a tiny size (chains' settings resolved by the rules and recorded),
    and a one-line error naming the key with the χ² regulariser."""
    import json

    import pytest

    from experiments.pipeline import run
    from experiments.validation import ConfigError
    from tests.helpers import make_cfg

    cfg = make_cfg(tmp_path, [
        "+experiment=gaussian", "data.dim=2", "regularizer.lam=0.5", "dual.estimator=langevin", "dual.steps=20",
        "dual.batch_size=64", "bp.steps=5", "eval.n_samples=200", "sampler.n_steps=20", "eval.dual_health_samples=200",
    ])  # fmt: skip
    run(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    auto = saved["auto"]["values"]
    assert "dual.estimator" not in auto and auto["dual.langevin.step_size"] == auto["sampler.step_size"]
    assert auto["dual.langevin.burn_in"] >= 10 and np.isfinite(saved["methods"]["scones"]["bw_uvp"])
    bad = make_cfg(tmp_path, ["+experiment=gaussian", "data.dim=2", "regularizer=chi2", "dual.estimator=langevin"])
    with pytest.raises(ConfigError, match="dual.estimator"):
        run(bad, tmp_path / "bad")


def test_chain_pool_resizes_per_process_and_reseeds_reproducibly():
    """A DDP process owns n / world chains; reseeding with (rank, step) repeats a step's noise exactly and gives
    every rank its own noise; a pool that has started cannot be resized."""
    import pytest

    src, tgt = RandomGaussian(2, role="source"), RandomGaussian(2, role="target")
    pot = _quadratic_pair(2, 0.5)
    x = src.sample(64, generator=torch.Generator().manual_seed(0))

    def run(rank, world=2):
        chains = ConditionalChains(64, (2,), 0.01, steps_per_update=2, burn_in=10, seed=5)
        chains.resize(64 // world)
        chains.reseed(rank, 0)
        chains.update(pot, ExactPriorScore(tgt), x, lambda z: z.clone())
        return chains

    a, b, c = run(0), run(0), run(1)
    assert a.y.shape == (32, 2) and torch.equal(a.y, b.y) and not torch.allclose(a.y, c.y)
    with pytest.raises(RuntimeError, match="before its first update"):
        a.resize(16)


LANGEVIN_TINY = [
    "+experiment=gaussian", "data.dim=2", "regularizer.lam=0.5", "dual.estimator=langevin", "dual.steps=20",
    "dual.batch_size=64", "checkpoint_every=10", "num_threads=1",
]  # fmt: skip


def _dual_weights(tmp_path, overrides=()):
    from experiments.pipeline import dual_stage
    from experiments.startup import start_job
    from tests.helpers import make_cfg

    problem, spec, _ = start_job(make_cfg(tmp_path, [*LANGEVIN_TINY, *overrides]), tmp_path / "run")
    pot, _ = dual_stage(spec, problem)
    return {k: v.clone() for k, v in pot.state_dict().items()}


def test_langevin_dual_resumes_mid_stage_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """Killed after its step-10 checkpoint, the dual stage resumes there (chains from the checkpoint, the chains'
    noise reseeded per step) and ends with the weights of the uninterrupted run, bit for bit."""
    import pytest

    from scones.models.dual import DualModule

    clean = _dual_weights(tmp_path / "clean")
    original = DualModule._langevin_loss

    def crash_at_15(self, x, y):
        if self.global_step == 15:
            raise RuntimeError("simulated crash")
        return original(self, x, y)

    monkeypatch.setattr(DualModule, "_langevin_loss", crash_at_15)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _dual_weights(tmp_path / "killed")
    monkeypatch.setattr(DualModule, "_langevin_loss", original)
    assert list((tmp_path / "killed").glob("cache/dual-*/checkpoints/step10.ckpt"))
    resumed = _dual_weights(tmp_path / "killed")
    assert clean.keys() == resumed.keys() and all(torch.equal(clean[k], resumed[k]) for k in clean)
