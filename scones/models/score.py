r"""Denoising score matching (Vincent 2011; NCSN σ-weighting) for a noise-conditional score model."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from scones.data.distributions import FullGaussianMixture
from scones.models.base import StageModule
from scones.nets.ema import EMA


def dsm_loss(
    net: nn.Module,
    y: Tensor,
    sigmas: Tensor | None = None,
    labels: Tensor | None = None,
    anneal_power: float = 2.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """σ-weighted denoising score-matching loss (Song & Ermon 2019, eq. 6; anneal_power 2 = λ(σ) = σ²).

        ℓ(θ) = mean_i ½ σ_i^p ‖s_θ(ỹ_i, σ_i) + z_i / σ_i‖²,   ỹ_i = y_i + σ_i z_i,   z_i ~ N(0, I),

    with σ_i = σ_{l_i}, ``p = anneal_power``, the squared norm summed over all pixels (not averaged), and
    noise-level indices ``l_i`` drawn uniformly in ``[0, L)`` unless ``labels`` is given. The minimiser is
    the score of the data convolved with N(0, σ²I); for data N(0, s²I) in D dims the minimum value at
    level σ is ``(D/2)·s²/(s²+σ²)`` (used in the tests). A network with a ``dsm_weight(σ, y)`` method that returns
    a tensor (NCSN with ``preconditioning="gaussian"``) replaces σ_i^p by that per-pixel weight inside the sum.

    Args:
        net: callable ``net(ỹ, sigma)`` receiving the σ values ``(n,)`` (see module docstring).
        y: clean data ``(n, *shape)``.
        sigmas: ``(L,)`` schedule; defaults to ``net.sigmas``.
        labels: optional ``(n,)`` LongTensor of level indices.
        generator: optional torch generator for the levels and the noise (must live on ``y.device``).

    Returns:
        scalar loss (mean over the batch).
    """
    if sigmas is None:
        sigmas = getattr(net, "sigmas", None)
        if sigmas is None:
            raise ValueError("dsm_loss needs `sigmas` (the network has no `sigmas` buffer)")
    sigmas = sigmas.to(y)
    n = y.shape[0]
    if labels is None:
        labels = torch.randint(0, sigmas.numel(), (n,), device=y.device, generator=generator)
    sig = sigmas[labels]
    sig_b = sig.view(n, *([1] * (y.ndim - 1)))
    z = torch.randn(y.shape, device=y.device, dtype=y.dtype, generator=generator)
    sq = (net(y + sig_b * z, sig) + z / sig_b).pow(2)
    weight = net.dsm_weight(sig, y) if hasattr(net, "dsm_weight") else None
    if weight is None:
        return (0.5 * sq.reshape(n, -1).sum(1) * sig.pow(anneal_power)).mean()
    if anneal_power != 2.0:
        raise ValueError(
            f"{type(net).__name__} weights its own DSM loss (dsm_weight, e.g. NCSN preconditioning='gaussian'); "
            f"anneal_power={anneal_power} would be ignored: leave score.anneal_power at 2"
        )
    return (0.5 * (weight * sq).reshape(n, -1).sum(1)).mean()


class MixtureExpert:
    """The score of a fitted full-covariance Gaussian mixture convolved with N(0, σ²I), used instead of the
    network at the large levels σ ≥ ``sigma_min`` (:attr:`ScoreModule.expert`).

    At those levels the noise is larger than the distance between neighbouring training images, so the score has
    to know the data's global shape (which digit, where its strokes go); a few-hundred-image score net trained
    briefly learns it poorly and its unconditional samples join two shapes, while a mixture of a few dozen
    Gaussians fitted by EM gets it in seconds and still generalises (its samples are not copies). The net keeps
    the small levels, where it matches a perfect fit of its data (docs/images.md point 10).
    """

    def __init__(self, mixture: FullGaussianMixture, sigma_min: float) -> None:
        if not sigma_min > 0:
            raise ValueError(f"MixtureExpert.sigma_min must be > 0, got {sigma_min}")
        self.mixture, self.sigma_min = mixture, float(sigma_min)
        self._on_device: dict = {}  # the mixture's tensors moved once to each device the chains run on

    @classmethod
    def fit(cls, x: Tensor, n_components: int, sigma_min: float, reg_covar: float = 1e-2,
            seed: int = 0) -> MixtureExpert:
        """EM fit of ``n_components`` full-covariance Gaussians to data ``x (n, *shape)``
        (:meth:`scones.data.FullGaussianMixture.fit`)."""
        return cls(FullGaussianMixture.fit(x, n_components, reg_covar=reg_covar, seed=seed), sigma_min)

    def applies(self, sigma: float) -> bool:
        return float(sigma) >= self.sigma_min

    def score(self, y: Tensor, sigma: float) -> Tensor:
        """∇ log (mixture ∗ N(0, σ²I))(y) for a batch ``(n, *shape)``."""
        if y.device not in self._on_device:
            self._on_device[y.device] = self.mixture.to(y.device)
        return self._on_device[y.device].convolved(float(sigma)).score(y)


class ScoreModule(StageModule):
    """Trains a noise-conditional score network ``net(y, sigma)`` on target samples by DSM.

    Args:
        net: the score network, called as ``net(y, sigma)`` with σ values ``(n,)``.
        sigmas: training schedule ``(L,)`` (levels drawn uniformly per sample).
        lr: Adam learning rate.
        skip_nonfinite: skip (and count) steps with a NaN/Inf loss instead of stopping.
        ema_decay: if set, keep an exponential moving average of the weights (:class:`scones.nets.ema.EMA`,
            updated after every optimizer step; NCSNv2 uses 0.999). The EMA is part of ``state_dict()``
            (``_extra_state``), hence of the Lightning checkpoint and of the stage's ``final.pt``, and
            :meth:`score` samples with the averaged weights.
        anneal_power: p of the DSM weight σ^p (:func:`dsm_loss`; 2 = NCSN, every level's loss of unit scale for a
            net that predicts −z; a smaller p weights the small levels more, by (σ_1/σ_L)^(2−p) at the ends).
        lr_schedule: ``"constant"`` or ``"cosine"`` (Adam's rate decays to 0 over the trainer's ``max_steps``).
        callbacks: extra Lightning callbacks this module brings to its trainer (e.g. sample grids).

    :attr:`expert` (a :class:`MixtureExpert`, None by default) replaces the network in :meth:`score` at the levels
    it covers. It is not trained by DSM and not part of ``state_dict()``: the net still learns every level, and
    whoever builds the module (the pipeline's score stage) fits the expert again in seconds when it loads one.
    """

    stage = "score"

    def __init__(
        self,
        net: nn.Module,
        sigmas: Tensor,
        lr: float = 1e-3,
        skip_nonfinite: bool = False,
        ema_decay: float | None = None,
        anneal_power: float = 2.0,
        lr_schedule: str = "constant",
        callbacks: list | None = None,
    ) -> None:
        super().__init__(lr, skip_nonfinite, lr_schedule)
        self.net, self.anneal_power = net, float(anneal_power)
        self.register_buffer("sigmas", torch.as_tensor(sigmas, dtype=torch.float32))
        # in a list, not a registered submodule: the optimiser never sees it and the state_dict keeps the plain
        # ``_extra_state["ema"] = {decay, shadow}`` format (older final.pt files load); starts on the first step
        self._ema: list[EMA] = [] if ema_decay is None else [EMA(net, ema_decay)]
        self._extra_callbacks = list(callbacks or [])
        self.expert: MixtureExpert | None = None

    @property
    def ema(self) -> EMA | None:
        """The EMA of ``net`` (:class:`scones.nets.ema.EMA`, torch's ``AveragedModel``), or None."""
        return self._ema[0] if self._ema else None

    def loss(self, batch):
        y = batch[-1] if isinstance(batch, (tuple, list)) else batch
        return dsm_loss(self.net, y, self.sigmas, anneal_power=self.anneal_power), {}

    def configure_callbacks(self):
        return self._extra_callbacks

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:  # before any callback (checkpoint) sees the step
            self.ema.update_parameters(self.net)

    # EMA persistence: nn.Module's extra state travels with state_dict() (Lightning checkpoints, final.pt)
    def get_extra_state(self) -> dict:
        if self.ema is None:
            return {}
        return {"ema": self.ema.ema_state() if self.ema.started else {"decay": self.ema.decay, "shadow": {}}}

    def set_extra_state(self, state: dict) -> None:
        if state and state.get("ema") is not None:
            if self.ema is None:  # weights trained with EMA loaded into a module built without it
                self._ema = [EMA(self.net, float(state["ema"]["decay"]))]
            if state["ema"]["shadow"]:
                self.ema.load_ema_state(state["ema"])

    def _apply(self, fn, *args, **kwargs):  # .to(device) / .double() move the EMA with the module
        for ema in getattr(self, "_ema", []):
            ema._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def sampling_net(self) -> nn.Module:
        """The network used by :meth:`score`: the EMA-averaged network (eval mode) if EMA is on, else ``net``."""
        if self.ema is None:
            return self.net
        if not self.ema.started:
            raise RuntimeError("ScoreModule: EMA is on but holds no averaged weights (not trained or not restored)")
        return self.ema.averaged(self.net)

    def score(self, y: Tensor, level: int | float) -> Tensor:
        """s_θ(y, σ) for a whole batch: ``level`` an int index into ``sigmas`` or a float σ; at σ ≥
        ``expert.sigma_min`` the :attr:`expert`'s score instead of the network's."""
        if isinstance(level, float):
            sigma = torch.full((y.shape[0],), level, dtype=y.dtype, device=y.device)
        else:
            sigma = self.sigmas[level].to(y.dtype).expand(y.shape[0])
        if self.expert is not None and self.expert.applies(sigma[0]):
            return self.expert.score(y, float(sigma[0]))
        return self.sampling_net()(y, sigma)
