r"""Online Sinkhorn (Mensch & Peyré, NeurIPS 2020): entropic OT potentials between two *sampleable* measures.

Problem (the project's convention, identical to :mod:`scones.ot.regularizers` ``KL``):

    OT_λ(α, β) = min_{π ∈ Π(α, β)} ∫ c dπ + λ·KL(π ‖ α⊗β),     c(x, y) = ‖x − y‖²  (summed, no ½)
    dual:  max_{f, g} E_α f + E_β g − λ·E_{α⊗β}[exp((f(x) + g(y) − c(x, y))/λ) − 1]
    plan:  dπ/d(α⊗β)(x, y) = exp((f(x) + g(y) − c(x, y))/λ)

so the potentials (f, g) returned here *are* the SCONES dual potentials (φ, ψ) for ``KL(lam=λ)``.
ε in the paper = λ here.

Representation.  Every iterate is a soft-min kernel expansion over the samples seen so far,

    f(x) = −λ log Σ_j exp((q_j − c(x, y_j))/λ)     (atoms y_j drawn from β, log-weights q_j in potential units)
    g(y) = −λ log Σ_i exp((p_i − c(x_i, y))/λ)     (atoms x_i drawn from α)

so f and g can be evaluated (and differentiated) anywhere.

Update (Robbins–Monro in the exponential domain, with the ε = λ factor on *every* weight — the refactored
official code omits it, see spec §1.9 pitfall 1; it is only right at ε = 1 there):

    exp(−f_{t+1}/λ) = (1 − η_t) exp(−f_t/λ) + η_t/b_t Σ_{j ∈ batch} exp((g_t(y_j) − c(·, y_j))/λ)
    ⇔  q_j ← q_j + λ log(1 − η_t)  (old atoms),     q_new = λ log(η_t / b_t) + g_t(y_new)  (appended),

then the same for g with the fresh f_{t+1} (Gauss–Seidel order, as in the reference code). Step t = 0 has
η_0 = 1 from g ≡ 0, i.e. f_0 = T_{β̂_0}(0). Schedules (reference code's ``schedule``):

    b_t = ceil(B (1 + 0.1 t)^{batch_exp}),    η_t = lr (1 + 0.1 t)^{−lr_exp},
    lr_exp = "auto" → min(max(0, 1 − batch_exp/2 + 0.1), 1)          (plain:   Σ η = ∞, Σ η/√b < ∞)
                      min(max(0, 1 − (batch_exp + 1)/2 + 0.1), 1)    (fully corrective: Σ η/√n_t < ∞)

Fully-corrective variant (``fully_corrective=True``): after appending the batch, *all* weights are refreshed
against the whole stored sample, exp(q_j/λ) ← (1 − η) exp(q_j/λ) + η m_j/n exp(g_t(y_j)/λ) (m_j = multiplicity,
n = Σ m_j), i.e. a damped Sinkhorn sweep on the growing empirical measure; O(n_t²) per step instead of O(b_t n_t).
η ≡ 1 (``lr=1, lr_exp=0``) is exactly Sinkhorn on the growing sample; ``lr=1, lr_exp=0, batch_exp=0`` with the
plain update is *randomized Sinkhorn* (a fresh batch each step, old atoms dropped).

Memory.  Nothing larger than a (block of evaluation points) × (support) matrix is formed; evaluations are split
in row blocks of at most ``block_size`` entries. ``max_support`` caps the number of atoms per potential: the
oldest atoms are dropped (FIFO) and the kept weights are rescaled to preserve Σ_j exp(q_j/λ), i.e. the dropped
part is approximated by the kept one (biased; the paper's theory assumes unbounded memory).
``merge_duplicates=True`` merges identical atoms (log-add-exp of their weights) — exact, and it keeps the support
bounded by the number of distinct points when α, β are discrete (sampling with replacement from a dataset).

Conversions to other libraries (same plan in all cases):

- POT: ``ot.bregman.sinkhorn_log(a, b, ot.dist(x, y), reg=λ, log=True)`` →
  f = λ (log_u − log a), g = λ (log_v − log b) (see :mod:`scones.ot.discrete`); ``ot.solve(...).value`` = OT_λ.
- GeomLoss ``SamplesLoss("sinkhorn", p=2, blur=σ, debias=False, potentials=True)``: cost ½‖x−y‖², ε = σ²;
  use σ = sqrt(λ/2); GeomLoss potentials = ½ (f, g), values = ½ OT_λ.
- OTT-JAX ``PointCloud(x, y, epsilon=λ)`` (cost ``SqEuclidean`` = ‖x−y‖²): same (f, g) up to (f + k, g − k)
  when the marginals are uniform; ``reg_ot_cost`` = OT_λ.
- Reference code ``arthurmensch/online_sinkhorn`` (cost ½‖x−y‖², eps): take eps = λ/2 and double its potentials.
- Janati et al. (2020) Gaussian closed form: σ² = λ/2 (:mod:`scones.ot.gaussian`).

Reference: A. Mensch, G. Peyré, "Online Sinkhorn: Optimal Transport distances from sample streams", NeurIPS 2020.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from scones.ot.costs import SquaredEuclidean
from scones.ot.regularizers import KL

Sampler = Callable[[int], Tensor]


def _flat(z: Tensor) -> Tensor:
    return z.reshape(z.shape[0], -1)


def _row_blocks(n_rows: int, n_cols: int, block_size: int) -> tuple[range, int]:
    """Start indices of row blocks so that each (rows × n_cols) block has at most ``block_size`` entries."""
    rows = max(1, block_size // max(n_cols, 1))
    return range(0, n_rows, rows), rows


class SoftMinExpansion:
    r"""Soft-min kernel expansion h(z) = −λ log Σ_j exp((w_j − c(z, a_j))/λ).

    ``atoms`` ``(N, *shape)``, ``log_weights`` ``(N,)`` (potential units). An empty expansion evaluates to 0
    (the initial potential of Online Sinkhorn). Evaluation is differentiable w.r.t. the query points.
    The discrete Sinkhorn potentials' out-of-sample extension is the same object with w_j = g_j + λ log b_j.
    """

    def __init__(self, atoms: Tensor, log_weights: Tensor, lam: float, cost=None, block_size: int = 2**20) -> None:
        if atoms.shape[0] != log_weights.shape[0] or log_weights.ndim != 1:
            raise ValueError(
                f"log_weights must have shape ({atoms.shape[0]},) to match atoms {tuple(atoms.shape)}, "
                f"got {tuple(log_weights.shape)}"
            )
        if not lam > 0:
            raise ValueError(f"lam must be > 0, got {lam}")
        self.atoms = atoms
        self.log_weights = log_weights
        self.lam = float(lam)
        self.cost = SquaredEuclidean("sum") if cost is None else cost
        self.block_size = int(block_size)

    def __len__(self) -> int:
        return self.atoms.shape[0]

    def _fast_terms(self, z: Tensor) -> tuple[Tensor, Tensor, float] | None:
        """For c = s‖x − y‖²: (w_j − s‖a_j‖²)/λ and (2s/λ) aᵀ, so scores need a single ``addmm`` (cached)."""
        if type(self.cost) is not SquaredEuclidean:
            return None
        if getattr(self, "_fast", None) is None:
            s = self.cost.scale(self.atoms)
            flat = _flat(self.atoms)
            offset = (self.log_weights - s * flat.pow(2).sum(1)) / self.lam
            self._fast = (offset, (2.0 * s / self.lam) * flat.T.contiguous(), s)
        return self._fast

    def _lse(self, z: Tensor) -> Tensor:
        """−h(z)/λ = log Σ_j exp((w_j − c(z_i, a_j))/λ) for a block of queries, shape ``(n,)``."""
        fast = self._fast_terms(z)
        if fast is None:
            return torch.logsumexp(self._scores(z), dim=1)
        offset, a_t, s = fast
        zf = _flat(z)
        lse = torch.logsumexp(torch.addmm(offset[None, :], zf, a_t), dim=1)
        return lse - (s / self.lam) * zf.pow(2).sum(1)

    def _scores(self, z: Tensor) -> Tensor:
        """(w_j − c(z_i, a_j))/λ for a block of queries, shape ``(n, N)``."""
        return (self.log_weights[None, :] - self.cost.pairwise(z, self.atoms)) / self.lam

    def _blocks(self, z: Tensor):
        starts, rows = _row_blocks(z.shape[0], len(self), self.block_size)
        for i in starts:
            yield z[i : i + rows]

    def _prepare(self, z: Tensor) -> Tensor:
        if z.device != self.atoms.device:
            raise ValueError(
                f"query points are on {z.device} but the potential's atoms are on {self.atoms.device}; "
                "move one of them (e.g. potentials.to(device))"
            )
        return z.to(self.atoms.dtype)

    def __call__(self, z: Tensor) -> Tensor:
        """h(z), shape ``(n,)``, dtype of ``z``."""
        if len(self) == 0:
            return torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        zc = self._prepare(z)
        out = [-self.lam * self._lse(zb) for zb in self._blocks(zc)]
        return torch.cat(out).to(z.dtype)

    def grad(self, z: Tensor) -> Tensor:
        """∇h(z) (autograd, block by block), same shape and dtype as ``z``; not differentiable further."""
        if len(self) == 0:
            return torch.zeros_like(z)
        out = []
        for zb in self._blocks(self._prepare(z.detach())):
            with torch.enable_grad():
                zb = zb.clone().requires_grad_(True)
                val = -self.lam * self._lse(zb)
                (gb,) = torch.autograd.grad(val.sum(), zb)
            out.append(gb)
        return torch.cat(out).to(z.dtype)

    def softmax_mean(self, z: Tensor) -> Tensor:
        """Σ_j softmax_j((w_j − c(z, a_j))/λ) a_j, shape ``(n, *atom_shape)`` (a barycentric average of atoms)."""
        zc = self._prepare(z)
        flat = _flat(self.atoms)
        out = [torch.softmax(self._scores(zb), dim=1) @ flat for zb in self._blocks(zc)]
        return torch.cat(out).reshape(z.shape[0], *self.atoms.shape[1:]).to(z.dtype)

    def to(self, device=None, dtype=None) -> SoftMinExpansion:
        return SoftMinExpansion(
            self.atoms.to(device=device, dtype=dtype),
            self.log_weights.to(device=device, dtype=dtype),
            self.lam,
            self.cost,
            self.block_size,
        )


class EntropicPotentials:
    r"""Entropic OT dual potentials (f, g) = SCONES (φ, ψ), KL convention, as two :class:`SoftMinExpansion`.

    ``f`` is carried by target atoms y_j, ``g`` by source atoms x_i. Exposes the SCONES dual interface
    ``phi(x) -> (n,)``, ``psi(y) -> (n,)``, ``cost``, ``regularizer`` (a :class:`~scones.ot.regularizers.KL`),
    so the conditional score term is ∇_y log H = (1/λ)(∇ψ(y) − ∇_y c(x, y)).
    Potentials are defined up to (f + k, g − k); compare them in variation norm (max − min of a difference).
    """

    def __init__(self, f: SoftMinExpansion, g: SoftMinExpansion, cost=None, regularizer: KL | None = None) -> None:
        if f.lam != g.lam:
            raise ValueError(f"f and g must share λ, got {f.lam} and {g.lam}")
        self.f = f
        self.g = g
        self.cost = f.cost if cost is None else cost
        self.regularizer = KL(f.lam) if regularizer is None else regularizer
        if not isinstance(self.regularizer, KL) or self.regularizer.lam != f.lam:
            raise ValueError(f"regularizer must be KL(lam={f.lam}) for Sinkhorn potentials, got {self.regularizer!r}")

    @property
    def lam(self) -> float:
        return self.f.lam

    def phi(self, x: Tensor) -> Tensor:
        """φ(x) = f(x), shape ``(n,)``."""
        return self.f(x)

    def psi(self, y: Tensor) -> Tensor:
        """ψ(y) = g(y), shape ``(n,)``."""
        return self.g(y)

    def grad_f(self, x: Tensor) -> Tensor:
        """∇f(x); for ‖x−y‖² this is 2 (x − E_π[Y | X = x])."""
        return self.f.grad(x)

    def grad_g(self, y: Tensor) -> Tensor:
        """∇g(y); for ‖x−y‖² this is 2 (y − E_π[X | Y = y])."""
        return self.g.grad(y)

    def log_density(self, x: Tensor, y: Tensor) -> Tensor:
        """log dπ/d(α⊗β)(x_i, y_i) = (f(x_i) + g(y_i) − c(x_i, y_i))/λ on paired rows, shape ``(n,)``."""
        return (self.f(x) + self.g(y) - self.cost(x, y)) / self.lam

    def density(self, x: Tensor, y: Tensor) -> Tensor:
        """Plan density H(x_i, y_i) = exp(log_density) on paired rows, shape ``(n,)``."""
        return torch.exp(self.log_density(x, y))

    def pairwise_density(self, x: Tensor, y: Tensor) -> Tensor:
        """H(x_i, y_j), shape ``(n, m)`` (dense: keep n·m small). The empirical plan is H / (n m)."""
        v = self.f(x)[:, None] + self.g(y)[None, :] - self.cost.pairwise(x, y)
        return torch.exp(v / self.lam)

    def conditional_mean(self, x: Tensor) -> Tensor:
        """E_π[Y | X = x] ≈ Σ_j softmax_j((q_j − c(x, y_j))/λ) y_j over the target atoms (barycentric projection)."""
        return self.f.softmax_mean(x)

    def dual_objective(self, x: Tensor, y: Tensor, block_size: int = 2**20) -> float:
        r"""Monte-Carlo dual value mean f(x) + mean g(y) − λ (mean_{i,j} exp(V_ij/λ) − 1), V = f ⊕ g − C.

        With independent fresh samples x ~ α, y ~ β this estimates OT_λ (equal to it at the optimum, and a
        lower bound in expectation otherwise). Computed in row blocks (no n × m matrix).
        """
        with torch.no_grad():
            fx, gy = self.f(x).double(), self.g(y).double()
            starts, rows = _row_blocks(x.shape[0], y.shape[0], block_size)
            mass = 0.0
            for i in starts:
                v = fx[i : i + rows, None] + gy[None, :] - self.cost.pairwise(x[i : i + rows], y).double()
                mass += float(torch.exp(v / self.lam).sum())
            mass /= x.shape[0] * y.shape[0]
            return float(fx.mean() + gy.mean()) - self.lam * (mass - 1.0)

    def to(self, device=None, dtype=None) -> EntropicPotentials:
        return EntropicPotentials(self.f.to(device, dtype), self.g.to(device, dtype), self.cost, self.regularizer)

    def state_dict(self) -> dict:
        """Tensors and λ, enough to rebuild with :meth:`from_state_dict` (e.g. ``torch.save``)."""
        return {
            "lam": self.lam,
            "f_atoms": self.f.atoms,
            "f_log_weights": self.f.log_weights,
            "g_atoms": self.g.atoms,
            "g_log_weights": self.g.log_weights,
            "cost_reduction": getattr(self.cost, "reduction", "sum"),
        }

    @classmethod
    def from_state_dict(cls, state: dict, cost=None, block_size: int = 2**20) -> EntropicPotentials:
        cost = SquaredEuclidean(state.get("cost_reduction", "sum")) if cost is None else cost
        lam = float(state["lam"])
        f = SoftMinExpansion(state["f_atoms"], state["f_log_weights"], lam, cost, block_size)
        g = SoftMinExpansion(state["g_atoms"], state["g_log_weights"], lam, cost, block_size)
        return cls(f, g, cost)

    def __repr__(self) -> str:
        return f"EntropicPotentials(lam={self.lam}, support=({len(self.f)}, {len(self.g)}), cost={self.cost!r})"


@dataclass
class _Support:
    """Mutable state of one potential during Online Sinkhorn (tensors are replaced, never modified in place)."""

    atoms: Tensor  # (N, *shape)
    log_weights: Tensor  # (N,) potential units
    log_counts: Tensor  # (N,) log multiplicity (for the fully-corrective weights after merging)
    stamp: Tensor  # (N,) step at which each atom was last appended (for the FIFO cap)


@dataclass
class OnlineSinkhornState:
    """What a ``callback`` receives after each step. ``potentials`` is a snapshot (tensors are not mutated later)."""

    step: int
    n_seen: int
    batch_size: int
    step_size: float
    potentials: EntropicPotentials
    elapsed: float


class OnlineSinkhorn:
    r"""Online Sinkhorn solver; see the module docstring for the maths and conventions.

    Args:
        lam: λ = ε > 0, weight of λ·KL(π ‖ α⊗β) (= POT ``reg`` with ``ot.dist`` = SCONES λ).
        cost: a cost with ``pairwise(x, y) -> (n, m)`` and diagonal ``__call__``; default ‖x − y‖² summed.
        batch_size: B, the initial batch size.
        batch_exp: growth exponent of b_t = ceil(B (1 + 0.1 t)^batch_exp).
        lr, lr_exp: η_t = lr (1 + 0.1 t)^{−lr_exp}, 0 < lr ≤ 1; ``lr_exp="auto"`` picks the convergent exponent.
        fully_corrective: refresh all weights every step (O(n_t²) per step).
        max_support: cap on the atoms per potential (``None`` = unbounded); batches are capped at it too.
        merge_duplicates: merge identical atoms (exact; bounds memory for discrete measures).
        block_size: max entries of any (points × atoms) block formed.
        dtype: cast samples to this dtype (default: keep the samplers' dtype); device follows the samples.

    Defaults: B = 100, batch_exp = 0.5 and lr_exp = "auto" (= 0.85): b_t ∝ t^½, η_t ∝ t^−0.85, which satisfies
    Σ η_t = ∞ and Σ η_t/√b_t < ∞ (spec §1.5).
    """

    def __init__(
        self,
        lam: float,
        cost=None,
        batch_size: int = 100,
        batch_exp: float = 0.5,
        lr: float = 1.0,
        lr_exp: float | str = "auto",
        fully_corrective: bool = False,
        max_support: int | None = None,
        merge_duplicates: bool = False,
        block_size: int = 2**20,
        dtype: torch.dtype | None = None,
    ) -> None:
        lam = float(lam)
        if not math.isfinite(lam) or lam <= 0:
            raise ValueError(f"lam must be a finite number > 0, got {lam}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if batch_exp < 0:
            raise ValueError(f"batch_exp must be >= 0, got {batch_exp}")
        if not 0 < lr <= 1:
            raise ValueError(f"lr must be in (0, 1] (η_t is a mixing weight), got {lr}")
        if lr_exp == "auto":
            shift = (batch_exp + 1.0) / 2.0 if fully_corrective else batch_exp / 2.0
            lr_exp = min(max(0.0, 1.0 - shift + 0.1), 1.0)
        elif isinstance(lr_exp, str) or lr_exp < 0:
            raise ValueError(f"lr_exp must be 'auto' or a number >= 0, got {lr_exp!r}")
        if max_support is not None and int(max_support) < 1:
            raise ValueError(f"max_support must be None or >= 1, got {max_support}")
        self.lam = lam
        self.cost = SquaredEuclidean("sum") if cost is None else cost
        self.batch_size = int(batch_size)
        self.batch_exp = float(batch_exp)
        self.lr = float(lr)
        self.lr_exp = float(lr_exp)
        self.fully_corrective = bool(fully_corrective)
        self.max_support = None if max_support is None else int(max_support)
        self.merge_duplicates = bool(merge_duplicates)
        self.block_size = int(block_size)
        self.dtype = dtype

    def schedule(self, t: int) -> tuple[int, float]:
        """(b_t, η_t) for step t ≥ 0; η_0 = 1 (first step from g ≡ 0)."""
        s = 1.0 + 0.1 * t
        b = math.ceil(self.batch_size * s**self.batch_exp)
        if self.max_support is not None:
            b = min(b, self.max_support)
        eta = 1.0 if t == 0 else self.lr * s ** (-self.lr_exp)
        return b, eta

    # ----------------------------------------------------------------------------------------------
    def _expansion(self, sup: _Support) -> SoftMinExpansion:
        return SoftMinExpansion(sup.atoms, sup.log_weights, self.lam, self.cost, self.block_size)

    def _draw(self, sampler: Sampler, n: int, name: str) -> Tensor:
        z = sampler(n)
        if not isinstance(z, Tensor) or z.ndim < 2 or z.shape[0] != n:
            got = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"{name}({n}) must return a Tensor of shape ({n}, ...), got {got}")
        return z.detach() if self.dtype is None else z.detach().to(self.dtype)

    def _absorb(self, sup: _Support | None, new: Tensor, other: SoftMinExpansion, eta: float, step: int) -> _Support:
        """One update of the potential carried by ``sup`` with a new batch ``new`` and the other potential."""
        lam, b = self.lam, new.shape[0]
        zeros = torch.zeros(b, dtype=new.dtype, device=new.device)
        if sup is None or (eta >= 1.0 and not self.fully_corrective):
            old = None  # η = 1: old atoms have weight λ log(0) and are dropped
        else:
            old = sup
        if self.fully_corrective:
            atoms = new if old is None else torch.cat([old.atoms, new])
            log_w = zeros - math.inf if old is None else torch.cat([old.log_weights, zeros - math.inf])
            log_c = zeros if old is None else torch.cat([old.log_counts, zeros])
            stamp = (
                torch.full((b,), step, device=new.device)
                if old is None
                else torch.cat([old.stamp, torch.full((b,), step, device=new.device)])
            )
            sup = self._compact(_Support(atoms, log_w, log_c, stamp))
            # exp(q/λ) ← (1 − η) exp(q/λ) + η m_j / n exp(g_t(y_j)/λ), on every stored atom
            fresh = math.log(eta) + sup.log_counts - torch.logsumexp(sup.log_counts, 0) + other(sup.atoms) / lam
            if eta < 1.0:
                fresh = torch.logaddexp(sup.log_weights / lam + math.log1p(-eta), fresh)
            return _Support(sup.atoms, lam * fresh, sup.log_counts, sup.stamp)
        new_w = lam * math.log(eta / b) + other(new)
        if old is None:
            sup = _Support(new, new_w, zeros, torch.full((b,), step, device=new.device))
        else:
            sup = _Support(
                torch.cat([old.atoms, new]),
                torch.cat([old.log_weights + lam * math.log1p(-eta), new_w]),
                torch.cat([old.log_counts, zeros]),
                torch.cat([old.stamp, torch.full((b,), step, device=new.device)]),
            )
        return self._compact(sup)

    def _compact(self, sup: _Support) -> _Support:
        """Merge duplicate atoms (optional) and enforce ``max_support`` (FIFO, mass-preserving)."""
        lam = self.lam
        if self.merge_duplicates:
            uniq, inv = _unique_rows(_flat(sup.atoms))
            n = uniq.shape[0]
            if n < len(sup.atoms):
                sup = _Support(
                    uniq.reshape(n, *sup.atoms.shape[1:]),
                    lam * _scatter_logsumexp(sup.log_weights / lam, inv, n),
                    _scatter_logsumexp(sup.log_counts, inv, n),
                    torch.zeros(n, dtype=sup.stamp.dtype, device=sup.stamp.device).scatter_reduce(
                        0, inv, sup.stamp, "amax", include_self=False
                    ),
                )
        if self.max_support is not None and len(sup.atoms) > self.max_support:
            # newest first; stable sort keeps the within-batch order deterministic
            keep = torch.argsort(sup.stamp, descending=True, stable=True)[: self.max_support]
            keep = torch.sort(keep).values
            shift = torch.logsumexp(sup.log_weights / lam, 0) - torch.logsumexp(sup.log_weights[keep] / lam, 0)
            if not torch.isfinite(shift):
                shift = torch.zeros_like(shift)
            sup = _Support(sup.atoms[keep], sup.log_weights[keep] + lam * shift, sup.log_counts[keep], sup.stamp[keep])
        return sup

    # ----------------------------------------------------------------------------------------------
    def fit(
        self,
        sample_source: Sampler,
        sample_target: Sampler,
        n_iter: int,
        max_samples: int | None = None,
        progress: bool = False,
        callback: Callable[[OnlineSinkhornState], None] | None = None,
    ) -> EntropicPotentials:
        """Run ``n_iter`` steps (or until ``max_samples`` samples per side were drawn).

        ``sample_source(n)`` / ``sample_target(n)`` return ``(n, *shape)`` tensors from α / β (fresh draws;
        sampling with replacement from a dataset is fine). Each step draws b_t points on each side.
        ``callback(state)`` is called after every step (its own run time is excluded from ``state.elapsed``).
        Returns the final :class:`EntropicPotentials`.
        """
        if int(n_iter) < 1:
            raise ValueError(f"n_iter must be >= 1, got {n_iter}")
        from tqdm.auto import trange

        f_sup: _Support | None = None
        g_sup: _Support | None = None
        empty = None
        n_seen, elapsed = 0, 0.0
        bar = trange(int(n_iter), disable=not progress, desc="online sinkhorn")
        with torch.no_grad():
            for t in bar:
                start = time.perf_counter()
                b, eta = self.schedule(t)
                if max_samples is not None:
                    b = min(b, max_samples - n_seen)
                    if b <= 0:
                        break
                y_new = self._draw(sample_target, b, "sample_target")
                if empty is None:
                    empty = SoftMinExpansion(y_new[:0], y_new.new_zeros(0), self.lam, self.cost)
                g_t = empty if g_sup is None else self._expansion(g_sup)
                f_sup = self._absorb(f_sup, y_new, g_t, eta, t)
                x_new = self._draw(sample_source, b, "sample_source")
                g_sup = self._absorb(g_sup, x_new, self._expansion(f_sup), eta, t)
                n_seen += b
                elapsed += time.perf_counter() - start
                if progress:
                    bar.set_postfix(support=len(f_sup.atoms), batch=b, eta=f"{eta:.3g}")
                if callback is not None:
                    pot = EntropicPotentials(self._expansion(f_sup), self._expansion(g_sup), self.cost)
                    callback(OnlineSinkhornState(t, n_seen, b, eta, pot, elapsed))
        return EntropicPotentials(self._expansion(f_sup), self._expansion(g_sup), self.cost)


def _unique_rows(flat: Tensor) -> tuple[Tensor, Tensor]:
    """Distinct rows of ``flat`` ``(N, D)`` and the inverse index (exact; rows are not sorted).

    Groups rows by a 1-D projection key (much faster than ``torch.unique(dim=0)``), then checks that every
    row equals its group's representative and falls back to ``torch.unique(dim=0)`` if a key collided.
    """
    r = (torch.arange(flat.shape[1], device=flat.device, dtype=flat.dtype) * 0.6180339887498949) % 1.0 + 0.5
    _, inv = torch.unique(flat @ r, return_inverse=True)
    n = int(inv.max()) + 1 if len(inv) else 0
    order = torch.arange(len(inv), device=flat.device)
    first = torch.full((n,), len(inv), device=flat.device).scatter_reduce(0, inv, order, "amin")
    rep = flat[first]
    if torch.equal(rep[inv], flat):
        return rep, inv
    return torch.unique(flat, dim=0, return_inverse=True)


def _scatter_logsumexp(values: Tensor, index: Tensor, n: int) -> Tensor:
    """out[k] = log Σ_{i: index_i = k} exp(values_i), shape ``(n,)`` (−inf for empty groups)."""
    m = torch.full((n,), -math.inf, dtype=values.dtype, device=values.device)
    m = m.scatter_reduce(0, index, values, "amax", include_self=True)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.zeros_like(m).scatter_add(0, index, torch.exp(values - m_safe[index]))
    return m_safe + torch.log(s)


__all__ = ["EntropicPotentials", "OnlineSinkhorn", "OnlineSinkhornState", "SoftMinExpansion"]
