"""Noise-conditional score networks (NCSN v1, NCSNv2) and the σ-weighted denoising score-matching loss.

References: Song & Ermon 2019 (NCSN, "Generative modeling by estimating gradients of the data
distribution") and 2020 (NCSNv2, "Improved techniques for training score-based generative models").
SCONES uses NCSN v1 for the 16×16 digit experiments and NCSNv2 for CelebA (scones.md §3a).

Conventions (shared by every score network in this file)
--------------------------------------------------------
* Images ``y`` live in [0, 1], shape ``(n, C, H, W)``; the networks map ``h = 2y − 1`` internally,
  so the returned score is ∇_y log q_σ(y) *with respect to the [0, 1] variable y* (scones.md P6).
* A score network owns its noise schedule as the buffer ``sigmas`` (shape ``(L,)``, σ_1 > … > σ_L),
  e.g. :func:`scones.sampling.schedules.geometric_sigmas`.
* Call signature ``net(y, t) -> Tensor`` shaped like ``y``, the project's ``net(y, sigma)`` convention
  (see :mod:`scones.models.score`), where ``t`` is either

  - a *floating* tensor ``(n,)`` (or scalar) of noise levels σ, or
  - an *integer* tensor ``(n,)`` (or Python int) of level indices into ``sigmas`` (0 = largest σ).

  ``net.score(y, level)`` is the same call, spelled for samplers.
* Pipeline convention: score networks are built with the flat data dimension ``dim = C·H·W`` (as the MLP
  score nets are) plus ``channels``; ``dim`` is only checked (a RefineNet works at any even H, W).
* NCSN v1 is conditioned on the level index (conditional InstanceNorm++ embeddings) and predicts the score
  directly; σ values are mapped to the index of the equal stored level (an error if there is none).
  NCSNv2 is unconditional and returns ``f_θ(y) / σ`` (noise-level-agnostic network), so it accepts any σ
  and may be re-scheduled with :meth:`ScoreNetwork.set_sigmas` to any number of levels (the SCONES χ² runs
  overwrite the stored schedule, scones.md P10).

Architecture (both versions): a RefineNet with dilated convolutions — ``begin_conv`` → 4 stages of two
pre-activation residual blocks (``ngf``, ``2ngf`` with one 2× mean-pool down-sampling, then ``2ngf`` with
dilation 2 and 4, no further down-sampling) → 4 RefineNet blocks (residual conv units, multi-resolution
fusion, chained residual pooling) → norm → ELU → ``end_conv``. NCSN v1 puts conditional InstanceNorm++
everywhere (including inside the RefineNet blocks, average pooling in the chained pooling); NCSNv2 uses
InstanceNorm++ in the residual blocks only and max pooling in the chained pooling. Inputs need H, W even
and ≥ 4 (8×8 digits run at 8×8 / 4×4 internally).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scones.sampling.schedules import geometric_sigmas


def check_flat_dim(name: str, dim: int | Sequence[int] | None, channels: int) -> None:
    """Check a flat dimension (or shape) handed to a convolutional net against its number of channels."""
    if dim is None:
        return
    flat = int(dim) if isinstance(dim, int) else math.prod(int(s) for s in dim)
    if flat < 1 or flat % int(channels):
        raise ValueError(
            f"{name}: data dimension {flat} is not a whole number of {channels}-channel images; set channels "
            "to the image channels (configs: channels: ${data.channels})"
        )


# --------------------------------------------------------------------------------------------------
# building blocks (all take ``(x, labels)``; unconditional modules ignore ``labels``)


class InstanceNormPlusPlus(nn.Module):
    """InstanceNorm++ (NCSN, Song & Ermon 2019), optionally conditional on a class/noise-level index.

    With per-channel spatial means μ_c normalised across channels, μ̃_c = (μ_c − mean_c μ)/√(var_c μ + ε):

        out_c = γ_c · (IN(x)_c + α_c μ̃_c) + β_c,

    where (γ, α, β) are parameters (``num_classes=None``) or rows of an embedding indexed by ``labels``.
    γ, α are initialised at N(1, 0.02²), β at 0.
    """

    def __init__(self, channels: int, num_classes: int | None = None, eps: float = 1e-5) -> None:
        super().__init__()
        self.channels, self.num_classes, self.eps = channels, num_classes, eps
        rows = 1 if num_classes is None else num_classes
        table = torch.zeros(rows, 3 * channels)
        table[:, : 2 * channels].normal_(1.0, 0.02)
        if num_classes is None:
            self.weight = nn.Parameter(table[0])
        else:
            self.embed = nn.Embedding(num_classes, 3 * channels)
            with torch.no_grad():
                self.embed.weight.copy_(table)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        means = x.mean(dim=(2, 3))
        correction = 1 if self.channels > 1 else 0
        m = means.mean(dim=1, keepdim=True)
        v = means.var(dim=1, keepdim=True, correction=correction)
        mu_tilde = (means - m) / torch.sqrt(v + self.eps)
        if self.num_classes is None:
            params = self.weight.expand(x.shape[0], -1)
        else:
            if labels is None:
                raise ValueError("conditional InstanceNorm++ needs `labels` (noise-level indices)")
            params = self.embed(labels)
        gamma, alpha, beta = params.chunk(3, dim=1)
        h = F.instance_norm(x, eps=self.eps) + (alpha * mu_tilde)[..., None, None]
        return gamma[..., None, None] * h + beta[..., None, None]


class _Identity(nn.Module):
    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        return x


def _conv3x3(cin: int, cout: int, dilation: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=bias)


class ResidualBlock(nn.Module):
    """Pre-activation residual block: norm → ELU → conv → norm → ELU → conv, plus a shortcut.

    ``resample=True`` marks the first block of a stage: it keeps ``cin`` channels in the first conv and
    changes them in the second; with ``dilation == 1`` its second conv is followed by a 2×2 mean pooling
    (the only down-sampling of the net), and its shortcut is a learned conv (1×1 + mean pool, or a dilated
    3×3 when ``dilation > 1``). Other blocks change channels in the first conv and use an identity
    shortcut when ``cin == cout``.
    """

    def __init__(
        self, cin: int, cout: int, num_classes: int | None, resample: bool = False, dilation: int = 1
    ) -> None:
        super().__init__()
        self.down = resample and dilation == 1
        mid = cin if resample else cout
        self.norm1 = InstanceNormPlusPlus(cin, num_classes)
        self.conv1 = _conv3x3(cin, mid, dilation)
        self.norm2 = InstanceNormPlusPlus(mid, num_classes)
        self.conv2 = _conv3x3(mid, cout, dilation)
        self.act = nn.ELU()
        if resample or cin != cout:
            self.shortcut: nn.Module = (
                nn.Conv2d(cin, cout, 1) if dilation == 1 else _conv3x3(cin, cout, dilation)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        h = self.conv1(self.act(self.norm1(x, labels)))
        h = self.conv2(self.act(self.norm2(h, labels)))
        skip = self.shortcut(x)
        if self.down:
            h, skip = F.avg_pool2d(h, 2), F.avg_pool2d(skip, 2)
        return h + skip


class ResidualConvUnit(nn.Module):
    """RefineNet RCU: ``n_blocks`` × (x ← x + [norm → ELU → conv3x3(no bias)] × ``n_stages``)."""

    def __init__(
        self, features: int, n_blocks: int, n_stages: int, num_classes: int | None, norm: bool
    ) -> None:
        super().__init__()
        self.n_blocks, self.n_stages = n_blocks, n_stages
        count = n_blocks * n_stages
        self.norms = nn.ModuleList(
            [InstanceNormPlusPlus(features, num_classes) if norm else _Identity() for _ in range(count)]
        )
        self.convs = nn.ModuleList([_conv3x3(features, features, bias=False) for _ in range(count)])
        self.act = nn.ELU()

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        k = 0
        for _ in range(self.n_blocks):
            h = x
            for _ in range(self.n_stages):
                h = self.convs[k](self.act(self.norms[k](h, labels)))
                k += 1
            x = x + h
        return x


class ChainedResidualPooling(nn.Module):
    """RefineNet CRP: x ← ELU(x); path ← x; repeat: path ← conv(pool₅ₓ₅(norm(path))), x ← x + path."""

    def __init__(self, features: int, n_stages: int, num_classes: int | None, norm: bool, pool: str) -> None:
        super().__init__()
        self.norms = nn.ModuleList(
            [InstanceNormPlusPlus(features, num_classes) if norm else _Identity() for _ in range(n_stages)]
        )
        self.convs = nn.ModuleList([_conv3x3(features, features, bias=False) for _ in range(n_stages)])
        self.pool = nn.MaxPool2d(5, 1, 2) if pool == "max" else nn.AvgPool2d(5, 1, 2)
        self.act = nn.ELU()

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        x = self.act(x)
        path = x
        for norm, conv in zip(self.norms, self.convs, strict=True):
            path = conv(self.pool(norm(path, labels)))
            x = x + path
        return x


class RefineBlock(nn.Module):
    """RefineNet block: RCU per input → multi-resolution fusion (conv, upsample, sum) → CRP → RCU."""

    def __init__(
        self,
        in_planes: Sequence[int],
        features: int,
        num_classes: int | None,
        norm: bool,
        pool: str,
        end: bool = False,
    ) -> None:
        super().__init__()
        self.adapt = nn.ModuleList([ResidualConvUnit(c, 2, 2, num_classes, norm) for c in in_planes])
        fuse = len(in_planes) > 1
        self.fuse_norms = nn.ModuleList(
            [InstanceNormPlusPlus(c, num_classes) if norm and fuse else _Identity() for c in in_planes]
        )
        self.fuse_convs = nn.ModuleList([_conv3x3(c, features) for c in in_planes]) if fuse else None
        self.crp = ChainedResidualPooling(features, 2, num_classes, norm, pool)
        self.out = ResidualConvUnit(features, 3 if end else 1, 2, num_classes, norm)

    def forward(self, xs: Sequence[Tensor], labels: Tensor | None, size: Sequence[int]) -> Tensor:
        hs = [rcu(x, labels) for rcu, x in zip(self.adapt, xs, strict=True)]
        if self.fuse_convs is None:
            h = hs[0]
        else:
            h = sum(
                F.interpolate(conv(norm(x, labels)), size=tuple(size), mode="bilinear", align_corners=True)
                for norm, conv, x in zip(self.fuse_norms, self.fuse_convs, hs, strict=True)
            )
        return self.out(self.crp(h, labels), labels)


class RefineNet(nn.Module):
    """Dilated RefineNet body shared by NCSN v1, NCSNv2 and the CelebA residual BP sampler.

    ``forward(h, labels)`` maps ``(n, in_channels, H, W)`` (already rescaled input) to
    ``(n, out_channels, H, W)``. ``num_classes=None`` gives the unconditional NCSNv2 layout
    (norms only in the residual blocks, max pooling); an int gives NCSN v1 (conditional norms
    everywhere, average pooling).
    """

    def __init__(
        self, in_channels: int, ngf: int, num_classes: int | None = None, out_channels: int | None = None
    ) -> None:
        super().__init__()
        nc, cond = num_classes, num_classes is not None
        pool = "avg" if cond else "max"
        g, g2 = ngf, 2 * ngf
        self.begin_conv = nn.Conv2d(in_channels, g, 3, padding=1)
        self.stages = nn.ModuleList(
            [
                nn.ModuleList([ResidualBlock(g, g, nc), ResidualBlock(g, g, nc)]),
                nn.ModuleList([ResidualBlock(g, g2, nc, resample=True), ResidualBlock(g2, g2, nc)]),
                nn.ModuleList(
                    [
                        ResidualBlock(g2, g2, nc, resample=True, dilation=2),
                        ResidualBlock(g2, g2, nc, dilation=2),
                    ]
                ),
                nn.ModuleList(
                    [
                        ResidualBlock(g2, g2, nc, resample=True, dilation=4),
                        ResidualBlock(g2, g2, nc, dilation=4),
                    ]
                ),
            ]
        )
        self.refine = nn.ModuleList(
            [
                RefineBlock([g2], g2, nc, cond, pool),
                RefineBlock([g2, g2], g2, nc, cond, pool),
                RefineBlock([g2, g2], g, nc, cond, pool),
                RefineBlock([g, g], g, nc, cond, pool, end=True),
            ]
        )
        self.final_norm = InstanceNormPlusPlus(g, nc)
        self.act = nn.ELU()
        self.end_conv = nn.Conv2d(g, out_channels or in_channels, 3, padding=1)

    def forward(self, h: Tensor, labels: Tensor | None = None) -> Tensor:
        if h.shape[-1] % 2 or h.shape[-2] % 2 or min(h.shape[-2:]) < 4:
            raise ValueError(f"RefineNet needs even H, W >= 4, got input shape {tuple(h.shape)}")
        h = self.begin_conv(h)
        feats = []
        for stage in self.stages:
            for block in stage:
                h = block(h, labels)
            feats.append(h)
        r = self.refine[0]([feats[3]], labels, feats[3].shape[2:])
        r = self.refine[1]([feats[2], r], labels, feats[2].shape[2:])
        r = self.refine[2]([feats[1], r], labels, feats[1].shape[2:])
        r = self.refine[3]([feats[0], r], labels, feats[0].shape[2:])
        return self.end_conv(self.act(self.final_norm(r, labels)))


# --------------------------------------------------------------------------------------------------
# score networks


class ScoreNetwork(nn.Module):
    """Base class: holds the schedule ``sigmas`` (buffer, ``(L,)``) and resolves the noise argument ``t``.

    ``level_conditional`` is True when the network only knows the σ values of its own schedule (NCSN v1):
    a sampler must then use exactly those levels.
    """

    sigmas: Tensor
    level_conditional: bool = False

    def __init__(self, sigmas: Tensor | Sequence[float], gaussian_baseline: bool = False) -> None:
        super().__init__()
        self.register_buffer("sigmas", self._check(sigmas))
        # per-pixel mean / variance of the data (fit_baseline); empty until fitted, any image shape when loaded
        self.gaussian_baseline = bool(gaussian_baseline)
        self.register_buffer("data_mean", torch.zeros(0))
        self.register_buffer("data_var", torch.zeros(0))

    @torch.no_grad()
    def fit_baseline(self, images: Tensor) -> None:
        """Per-pixel mean m and variance v of data ``images (n, C, H, W)`` for the Gaussian baseline."""
        images = images.float()
        self.data_mean = images.mean(0).to(self.sigmas.device)
        self.data_var = images.var(0, correction=0).to(self.sigmas.device)

    def _check_fitted(self) -> None:
        if self.data_mean.numel() == 0:
            raise RuntimeError(
                f"{type(self).__name__}(gaussian_baseline=True) needs the data's per-pixel statistics: call "
                "fit_baseline(images) before training (the score stage does) or load a trained state_dict"
            )

    def baseline_score(self, y: Tensor, sigma: Tensor, var_floor: float | Tensor = 0.0) -> Tensor:
        """−(y − m)/(v + σ²): the exact score of the data's diagonal Gaussian fit N(m, diag v) convolved with
        N(0, σ²I), per sample σ ``(n,)``. Exact on pixels the data never changes (v = 0), e.g. a black border.
        ``var_floor`` is added to v (NCSN's ``"gaussian"`` preconditioning: v_d = v + (σ_L/10)²)."""
        self._check_fitted()
        var = self.data_var.to(y.dtype) + var_floor + sigma.view(-1, *([1] * (y.ndim - 1))).pow(2)
        return -(y - self.data_mean.to(y.dtype)) / var

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("data_mean", "data_var"):  # stored statistics of any image shape replace the empty buffers
            stored = state_dict.get(prefix + name)
            if stored is not None and stored.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(stored, device=self.sigmas.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    def _check(sigmas: Tensor | Sequence[float]) -> Tensor:
        sig = torch.as_tensor(sigmas, dtype=torch.float32).flatten()
        if sig.numel() < 1 or bool((sig <= 0).any()):
            raise ValueError(f"sigmas must be a non-empty sequence of positive floats, got {sig.tolist()}")
        return sig

    @property
    def num_levels(self) -> int:
        return int(self.sigmas.numel())

    def _batch(self, y: Tensor, t: int | float | Tensor) -> Tensor:
        t = torch.as_tensor(t, device=y.device)
        if t.ndim == 0:
            t = t.expand(y.shape[0])
        t = t.reshape(-1)
        if t.shape[0] != y.shape[0]:
            raise ValueError(
                f"noise argument must be a scalar or have {y.shape[0]} entries, got {t.shape[0]}"
            )
        return t

    def noise_sigmas(self, y: Tensor, t: int | float | Tensor) -> Tensor:
        """σ per sample ``(n,)``: ``t`` itself if floating, else ``sigmas[t]``."""
        t = self._batch(y, t)
        if torch.is_floating_point(t):
            return t.to(y.dtype)
        if bool(((t < 0) | (t >= self.num_levels)).any()):
            raise IndexError(f"noise-level index out of range [0, {self.num_levels})")
        return self.sigmas[t].to(y.dtype)

    def noise_labels(self, y: Tensor, t: int | float | Tensor, rtol: float = 1e-4) -> Tensor:
        """Level index per sample ``(n,)``: ``t`` if integer, else the index of the stored σ equal to it."""
        t = self._batch(y, t)
        if not torch.is_floating_point(t):
            if bool(((t < 0) | (t >= self.num_levels)).any()):
                raise IndexError(f"noise-level index out of range [0, {self.num_levels})")
            return t.long()
        log_gap = (t.float().log()[:, None] - self.sigmas.log()[None]).abs()
        gap, idx = log_gap.min(dim=1)
        if bool((gap > rtol).any()):
            bad = float(t[gap.argmax()])
            raise ValueError(
                f"σ = {bad:.6g} is not one of the {self.num_levels} levels this noise-conditional network "
                f"was built for ({self.sigmas[0]:.4g} … {self.sigmas[-1]:.4g}); use the same schedule "
                "for training and sampling"
            )
        return idx

    def score(self, y: Tensor, level: int | float | Tensor) -> Tensor:
        """s_θ(y, σ) ≈ ∇_y log q_σ(y); ``level``: index or σ, scalar (whole batch) or ``(n,)``."""
        return self(y, level)

    def set_sigmas(self, sigmas: Tensor | Sequence[float]) -> None:
        """Replace the stored schedule (same number of levels unless the net is noise-level agnostic)."""
        self.sigmas = self._check(sigmas).to(self.sigmas.device)


class NCSN(ScoreNetwork):
    """NCSN v1 (Song & Ermon 2019): RefineNet with conditional InstanceNorm++ indexed by the noise level.

    ``forward(y, t)``: ``y`` in [0, 1] ``(n, C, H, W)``, ``t`` level indices or σ values of the stored
    schedule; returns the score estimate ``(n, C, H, W)``. Paper digits: ``ngf=64``, 10 levels 1 → 0.01.

    ``preconditioning`` sets how the body's output F becomes the score (``σ`` the level's noise, m, v the data's
    per-pixel mean and variance from :meth:`ScoreNetwork.fit_baseline`):

    * ``"none"``: s = F (the paper's NCSN v1).
    * ``"sigma"``: s = F/σ (NCSNv2's output parametrisation, Song & Ermon 2020, technique 3): the network then
      predicts −z, of unit scale at every level, instead of z/σ (×100 at σ = 0.01), which a small net trained
      briefly does not reach at the small levels (the speckle of the CPU digit samples; docs/images.md).
    * ``"gaussian"``: EDM's preconditioning (Karras et al. 2022) with the data's per-pixel Gaussian fit as the
      data model: the denoiser D(y) = m + c_skip·(y − m) + c_out·F with c_skip = v_d/(v_d + σ²),
      c_out = σ·√(v_d/(v_d + σ²)) (the posterior mean and std of a pixel under N(m, v_d)), and the score
      s = (D(y) − y)/σ² = −(y − m)/(v_d + σ²) + F·√(v_d/(v_d + σ²))/σ, where v_d = v + (σ_L/10)² (a pixel the
      data never changes is held at m with 99 % of the exact restoring force 1/σ² at every level, as with
      ``gaussian_baseline``, whatever F does there). F's regression target then has unit scale on
      every pixel at every level, and :meth:`dsm_weight` gives the DSM loss EDM's weight, which makes F's loss
      of unit scale too. On the CPU digits its samples read as one digit as often after 1 600 steps as those of
      ``"sigma"`` after 4 000 (their feature FID is worse there), and more often after 4 000 (0.79 against
      0.72, at a similar feature FID; docs/images.md point 9). Needs
      ``gaussian_baseline=True``.

    ``gaussian_baseline=True`` adds the exact score of the data's per-pixel Gaussian fit,
    −(y − m)/(v + σ²) (:meth:`ScoreNetwork.baseline_score`; m, v from :meth:`ScoreNetwork.fit_baseline`), so the
    network learns the residual. Pixels the data never changes (v ≈ 0, the black border of digits) are then held
    at m with the full restoring force 1/σ² at every level, which a short-trained net does not reach at the
    small levels (it would need a gain ∝ 1/σ there; docs/images.md point 6).
    """

    level_conditional = True
    PRECONDITIONING = ("none", "sigma", "gaussian")

    def __init__(
        self,
        channels: int = 1,
        ngf: int = 64,
        sigmas: Tensor | Sequence[float] | None = None,
        dim: int | None = None,
        preconditioning: str = "none",
        gaussian_baseline: bool = False,
        scale_by_sigma: bool | None = None,
    ) -> None:
        check_flat_dim(type(self).__name__, dim, channels)
        if scale_by_sigma is not None:  # the configs of runs saved before the rename still build and load
            if scale_by_sigma and preconditioning not in ("none", "sigma"):
                raise ValueError(f"NCSN: scale_by_sigma=True contradicts preconditioning={preconditioning!r}")
            warnings.warn(
                "NCSN(scale_by_sigma=...) is renamed: use preconditioning='sigma' (score.net.preconditioning: sigma) "
                "or 'none'", DeprecationWarning, stacklevel=2,
            )
            preconditioning = "sigma" if scale_by_sigma else preconditioning
        if preconditioning not in self.PRECONDITIONING:
            raise ValueError(f"NCSN preconditioning must be one of {self.PRECONDITIONING}, got {preconditioning!r}")
        if preconditioning == "gaussian" and not gaussian_baseline:
            raise ValueError(
                "NCSN preconditioning='gaussian' builds on the data's per-pixel Gaussian fit: set "
                "gaussian_baseline=True (score.net.gaussian_baseline: true)"
            )
        super().__init__(geometric_sigmas(1.0, 0.01, 10) if sigmas is None else sigmas, gaussian_baseline)
        self.channels, self.ngf, self.preconditioning = channels, ngf, preconditioning
        self.body = RefineNet(channels, ngf, num_classes=self.num_levels)

    def _var_floor(self, y: Tensor) -> Tensor:
        """(σ_L/10)², added to the data's per-pixel variance v by the ``"gaussian"`` preconditioning."""
        return (0.1 * self.sigmas.min().to(y.dtype)) ** 2

    def _data_var(self, y: Tensor) -> Tensor:
        """v_d = v + (σ_L/10)² per pixel (``"gaussian"`` preconditioning)."""
        return self.data_var.to(y.dtype) + self._var_floor(y)

    def forward(self, y: Tensor, t: int | float | Tensor) -> Tensor:
        labels = self.noise_labels(y, t)
        sig = self.sigmas[labels]
        out = self.body(2.0 * y - 1.0, labels)
        sig_b = sig.to(out.dtype).view(-1, *([1] * (y.ndim - 1)))
        if self.preconditioning == "gaussian":
            v_d = self._data_var(y)  # the Gaussian part is baseline_score with v_d for v
            return self.baseline_score(y, sig, self._var_floor(y)) + out * (v_d / (v_d + sig_b**2)).sqrt() / sig_b
        if self.preconditioning == "sigma":
            out = out / sig_b
        if self.gaussian_baseline:
            out = out + self.baseline_score(y, sig)
        return out

    def dsm_weight(self, sigma: Tensor, like: Tensor) -> Tensor | None:
        """Per-pixel weight of the DSM loss at per-sample σ ``(n,)`` for data shaped ``like``
        (:func:`scones.models.score.dsm_loss`), or None for the usual σ^p. ``"gaussian"``: σ²·(v_d + σ²)/v_d,
        i.e. ½‖(D(ỹ) − y)/c_out‖², EDM's λ(σ) = 1/c_out² per pixel."""
        if self.preconditioning != "gaussian":
            return None
        v_d = self._data_var(like)
        sig_b = sigma.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))
        return sig_b**2 * (v_d + sig_b**2) / v_d

    def set_sigmas(self, sigmas: Tensor | Sequence[float]) -> None:
        if torch.as_tensor(sigmas).numel() != self.num_levels:
            raise ValueError(
                f"NCSN (v1) is conditioned on {self.num_levels} level indices; a new schedule must have "
                "the same number of levels (use NCSNv2 for re-scheduling)"
            )
        super().set_sigmas(sigmas)


class NCSNv2(ScoreNetwork):
    """NCSNv2 (Song & Ermon 2020): unconditional RefineNet (InstanceNorm++, ELU) with output divided by σ.

    ``forward(y, t) = f_θ(2y − 1) / σ(t)`` for any σ > 0 (``t`` a σ value or a level index). Paper CelebA
    64 px config: ``ngf=128``, 500 levels 90 → 0.01 (a sampler may swap the schedule, any number of levels).
    """

    def __init__(
        self,
        channels: int = 3,
        ngf: int = 128,
        sigmas: Tensor | Sequence[float] | None = None,
        dim: int | None = None,
    ) -> None:
        check_flat_dim(type(self).__name__, dim, channels)
        super().__init__(geometric_sigmas(90.0, 0.01, 500) if sigmas is None else sigmas)
        self.channels, self.ngf = channels, ngf
        self.body = RefineNet(channels, ngf, num_classes=None)

    def forward(self, y: Tensor, t: int | float | Tensor) -> Tensor:
        sig = self.noise_sigmas(y, t)
        return self.body(2.0 * y - 1.0) / sig.view(-1, *([1] * (y.ndim - 1)))


__all__ = [
    "NCSN",
    "NCSNv2",
    "InstanceNormPlusPlus",
    "RefineNet",
    "ScoreNetwork",
    "check_flat_dim",
]
