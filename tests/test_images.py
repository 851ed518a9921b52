"""Image building blocks: loaders (fake trees, real sklearn digits), score nets, DSM, EMA, FID, classifier."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from torch import nn

from scones.data.images import (
    CelebAImages,
    DatasetNotFoundError,
    DigitsImages,
    ImageTensorDistribution,
    MNISTImages,
    USPSImages,
    load_digits_tensors,
    lowres,
)
from scones.metrics.classifier import label_consistency, train_digit_classifier
from scones.metrics.fid import FID, FIDWeightsNotFoundError, fid, resolve_inception_weights
from scones.models.score import dsm_loss
from scones.nets.ema import EMA
from scones.nets.image import FCSampler, ImageMLPPotential, ResidualSampler
from scones.nets.ncsn import NCSN, NCSNv2
from scones.sampling.schedules import geometric_sigmas
from tests.fakedata import write_fake_celeba, write_fake_mnist, write_fake_usps


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """Small convolutions on a shared 2-core machine: 2 intra-op threads were 10× slower than 1 under load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    usps = write_fake_usps(root, n=30, train=True, seed=1)
    mnist = write_fake_mnist(root, n_train=40, n_test=10, seed=2)
    celeba = write_fake_celeba(root, splits=(0, 0, 0, 0, 1, 2))
    return root, usps, mnist, celeba


# ------------------------------------------------------------------------------------------------ data


def test_usps_reads_fake_tree(fake_root):
    root, (pixels, labels), _, _ = fake_root
    ds = USPSImages(root)
    assert ds.shape == (1, 16, 16) and ds.dim == 256 and len(ds) == 30
    # torchvision's documented conversion of libsvm values in [-1, 1] to uint8, then /255
    expected = ((pixels + 1) / 2 * 255).astype(np.uint8) / 255.0
    np.testing.assert_allclose(ds.images[:, 0].numpy(), expected, atol=1e-6)
    np.testing.assert_array_equal(ds.labels.numpy(), labels)
    even, odd = USPSImages(root, subset="even"), USPSImages(root, subset="odd")
    torch.testing.assert_close(
        torch.cat([even.images, odd.images]),
        ds.images[torch.cat([torch.arange(0, 30, 2), torch.arange(1, 30, 2)])],
    )


def test_mnist_reads_fake_tree_and_resizes_like_pil(fake_root):
    root, _, mnist, _ = fake_root
    raw, labels = mnist["train"]
    ds = MNISTImages(root, size=16)
    assert ds.shape == (1, 16, 16) and len(ds) == 40
    assert 0.0 <= float(ds.images.min()) and float(ds.images.max()) <= 1.0
    # the paper resizes with PIL bilinear; PIL rounds to uint8, so agree to ~1/255
    pil = np.stack([np.asarray(Image.fromarray(a).resize((16, 16), Image.BILINEAR)) for a in raw]) / 255.0
    np.testing.assert_allclose(ds.images[:, 0].numpy(), pil, atol=1.5 / 255)
    np.testing.assert_array_equal(ds.labels.numpy(), labels)
    assert len(MNISTImages(root, train=False)) == 10


def test_celeba_reads_fake_tree(fake_root):
    root, _, _, names = fake_root
    sizes = {s: len(CelebAImages(root, split=s, resolution=16)) for s in ("train", "valid", "test", "all")}
    assert sizes == {"train": 4, "valid": 1, "test": 1, "all": 6}
    ds = CelebAImages(root, resolution=16, random_flip=False)
    img = ds.load(0)
    assert img.shape == (3, 16, 16) and ds.shape == (3, 16, 16) and ds.dim == 768
    # fake images are a horizontal ramp v(col) = col/177 on 178 columns; CenterCrop(140) keeps columns
    # 19..158, so output pixel k (of 16) averages around column 19 + 8.75 (k + ½). Edges: filter truncation.
    centre = (19 + 8.75 * (np.arange(16) + 0.5)) / 177
    np.testing.assert_allclose(img[:, 4, 2:-2].numpy(), np.broadcast_to(centre[2:-2], (3, 12)), atol=0.02)
    # the super-resolution source = the same PIL image resized to R/2 and back to R
    src = CelebAImages(root, resolution=16, downsample=2, random_flip=False)
    with Image.open(root / "celeba" / "img_align_celeba" / names[0]) as im:
        crop = im.convert("RGB").crop((19, 39, 159, 179))
        truth = np.asarray(crop.resize((8, 8), Image.BILINEAR).resize((16, 16), Image.BILINEAR)) / 255.0
    np.testing.assert_allclose(src.load(0).permute(1, 2, 0).numpy(), truth, atol=1e-6)
    # random flips: the ramp increases or decreases; both happen about half of the time
    flipper = CelebAImages(root, resolution=16, random_flip=True)
    batch = flipper.sample(400, generator=torch.Generator().manual_seed(0))
    increasing = (batch[:, 0, 8, -1] > batch[:, 0, 8, 0]).float().mean()
    assert batch.shape == (400, 3, 16, 16) and 0.4 < float(increasing) < 0.6
    even, odd = CelebAImages(root, subset="even"), CelebAImages(root, subset="odd")
    assert set(even.filenames).isdisjoint(odd.filenames) and len(even) + len(odd) == 4


def test_fake_celeba_tree_is_accepted_by_torchvision(fake_root):
    from torchvision.datasets import CelebA

    class NoMd5CelebA(CelebA):
        file_list = [(i, None, f) for i, _, f in CelebA.file_list]

    root = fake_root[0]
    ds = NoMd5CelebA(str(root), split="all", target_type=["attr", "identity", "bbox", "landmarks"])
    assert len(ds) == 6 and ds.attr.shape == (6, 40)


@pytest.mark.parametrize(
    ("cls", "files"),
    [
        (USPSImages, ["usps.bz2"]),
        (MNISTImages, ["MNIST/raw/train-images-idx3-ubyte", "MNIST/raw/t10k-labels-idx1-ubyte"]),
        (CelebAImages, ["celeba/img_align_celeba", "celeba/list_eval_partition.txt"]),
    ],
)
def test_missing_dataset_error_names_dir_files_and_command(tmp_path, cls, files):
    name = cls.__name__.removesuffix("Images").lower()
    with pytest.raises(DatasetNotFoundError) as info:
        cls(tmp_path / "empty")
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert str(tmp_path / "empty") in msg
    assert all(f in msg for f in files)
    assert f"python scripts/prepare_data.py {name} --root {tmp_path / 'empty'}" in msg


def test_digits_real_data_target_source_and_labels():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    target, source = DigitsImages(), DigitsImages(downsample=2)
    assert target.shape == source.shape == (1, 8, 8) and len(target) == 1797
    np.testing.assert_allclose(target.images[:, 0].numpy(), bunch.images / 16.0, atol=1e-7)

    # source: the same images through a 4×4 bottleneck; truth = PIL's float bilinear resize 8 → 4 → 8
    def pil_chain(a: np.ndarray) -> np.ndarray:
        im = Image.fromarray(a.astype(np.float32), mode="F")
        return np.asarray(im.resize((4, 4), Image.BILINEAR).resize((8, 8), Image.BILINEAR))

    truth = np.stack([pil_chain(a) for a in bunch.images[:200] / 16.0]).clip(0, 1)
    np.testing.assert_allclose(source.images[:200, 0].numpy(), truth, atol=1e-5)
    torch.testing.assert_close(lowres(target.images[:200], 2), source.images[:200])
    tv = (source.images[..., 1:] - source.images[..., :-1]).abs().mean()  # total variation: blurrier
    assert tv < 0.75 * (target.images[..., 1:] - target.images[..., :-1]).abs().mean()
    x, y = source.sample(64, generator=torch.Generator().manual_seed(0), return_labels=True)
    match = (x[:, None] == source.images[None]).flatten(2).all(-1)  # (64, N) which rows were drawn
    assert bool(match.any(1).all())
    assert all(int(y[i]) in set(source.labels[match[i]].tolist()) for i in range(64))
    # sampled images depend only on the generator
    torch.testing.assert_close(
        source.sample(8, torch.Generator().manual_seed(3)), source.sample(8, torch.Generator().manual_seed(3))
    )


def test_tensor_distribution_flips_and_validates():
    imgs = torch.zeros(1, 1, 2, 4)
    imgs[..., 0] = 1.0  # left column bright
    dist = ImageTensorDistribution(imgs, random_flip=True)
    batch = dist.sample(2000, torch.Generator().manual_seed(0))
    left = float(batch[:, 0, 0, 0].mean())
    assert abs(left - 0.5) < 0.05 and torch.equal(batch[:, 0, 0, 0] + batch[:, 0, 0, -1], torch.ones(2000))
    with pytest.raises(ValueError, match="no labels"):
        dist.sample(2, return_labels=True)
    with pytest.raises(ValueError, match="subset"):
        DigitsImages(subset="first")


# ------------------------------------------------------------------------------------------------ nets


@pytest.mark.parametrize("size", [8, 16])
def test_score_nets_shapes_and_noise_conditioning(size):
    torch.manual_seed(0)
    sig = geometric_sigmas(1.0, 0.01, 5)
    torch.testing.assert_close(sig, torch.tensor([1.0, 10**-0.5, 0.1, 10**-1.5, 0.01]))
    y = torch.rand(3, 1, size, size)
    v1, v2 = NCSN(1, ngf=8, sigmas=sig), NCSNv2(1, ngf=8, sigmas=sig)
    for net in (v1, v2):
        out = net(y, torch.tensor([0, 2, 4]))
        assert out.shape == y.shape and torch.isfinite(out).all()
        torch.testing.assert_close(net.score(y, 3), net(y, torch.full((3,), 3)))
        # the project's net(y, sigma) convention: σ values select the same levels as indices
        torch.testing.assert_close(net(y, sig[[0, 2, 4]]), out)
        torch.testing.assert_close(net(y, float(sig[1])), net.score(y, 1))
    with pytest.raises(ValueError, match="not one of the 5 levels"):
        v1(y, 0.5)
    torch.testing.assert_close(v2(y, 0.5) * 0.5, v2(y, 0) * sig[0])  # NCSNv2: any σ
    # NCSNv2 is noise-level agnostic: σ · s(y, σ) is the same network output for every level
    scaled = torch.stack([v2.score(y, i) * sig[i] for i in range(5)])
    torch.testing.assert_close(scaled, scaled[:1].expand_as(scaled), rtol=1e-5, atol=1e-5)
    # NCSN v1 is conditioned through the norm embeddings: perturbing row 0 changes level 0 only
    before0, before2 = v1.score(y, 0), v1.score(y, 2)
    with torch.no_grad():
        for m in v1.modules():
            if hasattr(m, "embed"):
                m.embed.weight[0] += 0.5
    assert not torch.allclose(v1.score(y, 0), before0, atol=1e-3)
    torch.testing.assert_close(v1.score(y, 2), before2)
    # NCSNv2 can be re-scheduled (any number of levels), NCSN v1 cannot
    v2.set_sigmas(geometric_sigmas(9.0, 0.01, 50))
    assert v2.num_levels == 50 and v2.score(y, 49).shape == y.shape
    with pytest.raises(ValueError, match="same number of levels"):
        v1.set_sigmas(geometric_sigmas(1.0, 0.01, 6))
    with pytest.raises(ValueError, match="even H, W"):
        v2(torch.rand(1, 1, 7, 7), torch.tensor([0]))


def test_ncsn_v1_levels_are_distinct():
    torch.manual_seed(0)
    net = NCSN(1, ngf=8, sigmas=geometric_sigmas(1.0, 0.01, 4))
    with torch.no_grad():  # give every level its own random norm parameters
        for m in net.modules():
            if hasattr(m, "embed"):
                m.embed.weight.normal_(1.0, 0.3)
    y = torch.rand(2, 1, 8, 8)
    outs = [net.score(y, i) for i in range(4)]
    assert all(not torch.allclose(outs[0], o, atol=1e-4) for o in outs[1:])


def test_ncsn_v1_sigma_preconditioning_divides_the_same_body_by_the_level_sigma():
    sig = geometric_sigmas(1.0, 0.01, 4)
    torch.manual_seed(0)
    plain = NCSN(1, ngf=4, sigmas=sig)
    scaled = NCSN(1, ngf=4, sigmas=sig, preconditioning="sigma")
    scaled.load_state_dict(plain.state_dict())
    y = torch.rand(3, 1, 8, 8)
    for i, s in enumerate(sig.tolist()):
        with torch.no_grad():
            assert torch.allclose(scaled(y, i) * s, plain(y, i), rtol=1e-5, atol=1e-6)
            assert torch.allclose(scaled(y, s), scaled(y, i))  # σ value or level index
    labels = torch.tensor([0, 3, 1])  # per-sample levels
    with torch.no_grad():
        assert torch.allclose(scaled(y, labels) * sig[labels].view(-1, 1, 1, 1), plain(y, labels), atol=1e-6)
    # a config saved before the rename (scale_by_sigma) still builds the same network, with a warning
    with pytest.warns(DeprecationWarning, match="preconditioning='sigma'"):
        old = NCSN(1, ngf=4, sigmas=sig, scale_by_sigma=True)
    old.load_state_dict(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(old(y, labels), scaled(y, labels))
    with pytest.raises(ValueError, match="contradicts"):
        NCSN(1, ngf=4, sigmas=sig, scale_by_sigma=True, preconditioning="gaussian", gaussian_baseline=True)


class _GaussianScore(nn.Module):
    """Exact score of N(0, s²I) convolved with N(0, σ²I): −y / (s² + σ²)."""

    def __init__(self, s2: float, sigmas: torch.Tensor, scale: float = 1.0) -> None:
        super().__init__()
        self.s2, self.scale = s2, scale
        self.register_buffer("sigmas", sigmas)

    def forward(self, y, sigma):
        sig = sigma.view(-1, 1, 1, 1)
        return -self.scale * y / (self.s2 + sig**2)


def test_dsm_loss_matches_closed_form_on_gaussian_data():
    # minimum DSM value at level σ for data N(0, s²I_D): (D/2)·s²/(s²+σ²); weighting σ² (anneal_power 2)
    s2, sig, n = 0.25, geometric_sigmas(1.0, 0.05, 4), 20_000
    g = torch.Generator().manual_seed(0)
    y = 0.5 * torch.randn(n, 1, 4, 4, generator=g)
    exact = _GaussianScore(s2, sig)
    for lvl in range(4):
        labels = torch.full((n,), lvl)
        got = float(dsm_loss(exact, y, labels=labels, generator=g))
        want = 8.0 * s2 / (s2 + float(sig[lvl]) ** 2)
        assert got == pytest.approx(want, rel=0.02)
    avg = float(dsm_loss(exact, y, generator=g))  # uniformly drawn levels
    assert avg == pytest.approx(float((8.0 * s2 / (s2 + sig**2)).mean()), rel=0.02)
    worse = float(dsm_loss(_GaussianScore(s2, sig, scale=1.2), y, generator=g))
    assert worse > avg * 1.01


@pytest.mark.parametrize("cls", [NCSN, NCSNv2])
def test_dsm_loss_decreases_on_tiny_net(cls):
    torch.manual_seed(0)
    images, _ = load_digits_tensors()
    net = cls(1, ngf=8, sigmas=geometric_sigmas(1.0, 0.01, 10))
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    fixed = images[:256]

    def held_out_loss():
        with torch.no_grad():
            return float(dsm_loss(net, fixed, generator=torch.Generator().manual_seed(1)))

    before = held_out_loss()
    g = torch.Generator().manual_seed(2)
    for _ in range(25):
        batch = images[torch.randint(0, len(images), (64,), generator=g)]
        loss = dsm_loss(net, batch, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out_loss()
    assert after < 0.85 * before, (before, after)  # held-out loss with identical noise: a real decrease


def test_image_mlp_potential_and_samplers():
    torch.manual_seed(0)
    pot = ImageMLPPotential((1, 4, 4), hidden=[32, 32, 16])
    kinds = [type(m).__name__ for m in pot.net]
    # Linear(in→h0) (no activation) → Linear, ReLU → Linear → ReLU → Linear(→1)   (scones.md §2, P7)
    assert kinds == ["Linear", "Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert [m.out_features for m in pot.net if isinstance(m, nn.Linear)] == [32, 32, 16, 1]
    x = torch.rand(5, 1, 4, 4)
    assert pot(x).shape == (5,)
    fc = FCSampler((1, 4, 4), hidden=[16, 16])
    out = fc(x)
    assert out.shape == x.shape and bool((out > 0).all() and (out < 1).all())
    # output = (tanh(h)+1)/2 of the MLP on 2x − 1
    torch.testing.assert_close(out, 0.5 * (torch.tanh(fc.net((2 * x - 1).flatten(1))) + 1).view_as(x))
    res = ResidualSampler(channels=3, ngf=4)
    xr = torch.rand(2, 3, 8, 8)
    out = res(xr)
    assert out.shape == xr.shape and bool((out > 0).all() and (out < 1).all())
    torch.testing.assert_close(out, torch.sigmoid(res.body(2 * xr - 1)))


# ------------------------------------------------------------------------------------------------ EMA


def test_ema_closed_form_pickle_and_state_dict():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = EMA(model, decay=0.9)
    ema.update_parameters(model)  # the first update copies the weights (torch's AveragedModel)
    theta0 = {k: v.clone() for k, v in ema.shadow().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for _ in range(20):
        ema.update_parameters(model)
    # shadow_k = θ + μ^k (θ_0 − θ)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ema.shadow()[name], p + 0.9**20 * (theta0[name] - p))
    clone = pickle.loads(pickle.dumps(ema))  # spawn-safe: the update closure is rebuilt from decay
    assert clone.decay == 0.9 and all(torch.equal(clone.shadow()[k], v) for k, v in ema.shadow().items())
    clone.update_parameters(model)
    ema.update_parameters(model)
    assert all(torch.equal(clone.shadow()[k], v) for k, v in ema.shadow().items())
    restored = EMA(model, decay=0.5)
    restored.load_ema_state(ema.ema_state())
    assert restored.decay == 0.9 and restored.started
    running = model[1].running_mean.clone()
    averaged = restored.averaged(model)
    assert torch.equal(averaged[0].weight, ema.shadow()["0.weight"]) and not torch.equal(
        model[0].weight, averaged[0].weight
    )
    for _ in range(300):
        ema.update_parameters(model)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ema.shadow()[name], p, atol=1e-6, rtol=0)  # converged to the weights
    assert torch.equal(model[1].running_mean, running)  # the model's buffers are untouched


# ------------------------------------------------------------------------------------------------ FID


class _TinyExtractor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten()
        )

    def forward(self, x):
        return self.net(x)


class _ChannelMean(nn.Module):
    num_features = 3

    def forward(self, x):
        return x.mean(dim=(2, 3))


def _frechet(f1: np.ndarray, f2: np.ndarray) -> float:
    m1, m2 = f1.mean(0), f2.mean(0)
    c1, c2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(c1 @ c2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(c1 + c2 - 2 * covmean))


def test_fid_tiny_extractor_identical_shifted_and_independent_formula():
    images, _ = load_digits_tensors()
    real, other = images[:600], images[600:1200]
    ext = _TinyExtractor()
    assert abs(fid(real, real, feature_extractor=ext, input_size=(3, 8, 8))) < 1e-6
    same_law = fid(real, other, feature_extractor=ext)
    shifted = fid(real, (other + 0.3).clamp(0, 1), feature_extractor=ext)
    assert shifted > 20 * max(same_law, 1e-6)
    with torch.no_grad():
        f_real = ext(real.expand(-1, 3, -1, -1)).double().numpy()
        f_shift = ext((other + 0.3).clamp(0, 1).expand(-1, 3, -1, -1)).double().numpy()
    assert shifted == pytest.approx(_frechet(f_real, f_shift), rel=1e-3)
    # streaming use and reset of generated statistics only
    metric = FID(feature_extractor=ext, batch_size=128)
    metric.update(real, real=True)
    metric.update(other, real=False)
    assert metric.compute() == pytest.approx(same_law, rel=1e-4)
    metric.reset(real=False)
    metric.update(real, real=False)
    assert abs(metric.compute()) < 1e-6


def test_fid_matches_gaussian_closed_form():
    # features = per-channel means of constant images with channel values N(m, diag(s²)):
    # FID = ‖m_1 − m_2‖² + Σ_c (s_1c − s_2c)²
    g = torch.Generator().manual_seed(0)
    n = 20_000
    m1, s1 = torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.05, 0.04, 0.03])
    m2, s2 = torch.tensor([0.6, 0.5, 0.45]), torch.tensor([0.1, 0.04, 0.06])
    a = (m1 + s1 * torch.randn(n, 3, generator=g))[:, :, None, None].expand(-1, -1, 4, 4)
    b = (m2 + s2 * torch.randn(n, 3, generator=g))[:, :, None, None].expand(-1, -1, 4, 4)
    want = float(((m1 - m2) ** 2).sum() + ((s1 - s2) ** 2).sum())
    assert fid(a, b, feature_extractor=_ChannelMean()) == pytest.approx(want, rel=0.03)


def test_fid_missing_inception_weights_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("FID_INCEPTION_WEIGHTS", str(tmp_path / "nope.pth"))
    with pytest.raises(FIDWeightsNotFoundError) as info:
        FID()
    msg = str(info.value)
    assert "FID_INCEPTION_WEIGHTS" in msg and str(tmp_path / "nope.pth") in msg and "torch_home" in msg
    present = tmp_path / "w.pth"
    present.write_bytes(b"x")
    assert resolve_inception_weights(present) == present


# ------------------------------------------------------------------------------------------------ classifier


def test_digit_classifier_accuracy_and_label_consistency():
    images, labels = load_digits_tensors()
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1200], perm[1200:]
    clf = train_digit_classifier(images[train], labels[train], seed=0)
    acc = label_consistency(clf, images[test], labels[test])
    assert acc >= 0.90, acc
    # (n, k, C, H, W) samples: k copies of the source image → same score; wrong labels → lower score
    stacked = images[test][:, None].expand(-1, 3, -1, -1, -1)
    assert label_consistency(clf, stacked, labels[test]) == pytest.approx(acc)
    assert label_consistency(clf, images[test], (labels[test] + 1) % 10) < 0.1


def test_feature_fid_and_kid_in_classifier_space_identical_floor_and_degraded():
    from scones.metrics.feature_distance import PenultimateFeatures, feature_distances, reference_halves

    images, labels = load_digits_tensors()  # 8x8
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, held = perm[:600], perm[600:1000]
    clf = train_digit_classifier(images[train], labels[train], epochs=3, width=4, seed=0)
    feats = PenultimateFeatures(clf)
    assert feats.num_features == 2 * 4 * 16
    reference = images[held]
    half_a, half_b = reference_halves(reference, seed=3)
    blurred = torch.nn.functional.avg_pool2d(half_b, 3, stride=1, padding=1, count_include_pad=False)
    sets = {"identical": half_a, "other_digits": images[1000:1400], "blurred": blurred,
            "shifted": torch.roll(half_b, shifts=2, dims=-1)}
    out = feature_distances(feats, reference, sets, n_splits=1, kid_subsets=20, seed=3)
    fid, kid = out["fid"], {k: v["mean"] for k, v in out["kid"].items()}
    assert out["n_reference"] == 200 and out["n_per_set"] == 200 and out["features"] == 128
    assert abs(fid["identical"]) < 1e-6 * fid["target_floor"]  # same images: 0 up to round-off
    # the floor (two disjoint held-out halves) is what fresh images of the same law get: another 200 digits do
    # as well; every degraded set is far above it
    assert fid["target_floor"] > 0 and fid["other_digits"] < 1.5 * fid["target_floor"]
    for bad in ("blurred", "shifted"):
        assert fid[bad] > 3 * fid["target_floor"], (bad, fid)
        assert kid[bad] > 10 * max(abs(kid["target_floor"]), abs(kid["other_digits"])), (bad, kid)
    assert abs(kid["identical"]) < 0.2 * kid["blurred"]


def test_score_figure_script_puts_runs_side_by_side_with_their_numbers(tmp_path, monkeypatch, capsys):
    """scripts/digits_score_figure.py: panels from the ablation's grids, caption from its JSON lines (the last one
    per label)."""
    import json
    import runpy
    import sys
    from pathlib import Path

    from experiments.images import grid_png

    for label in ("a", "b"):
        (tmp_path / f"{label}.png").write_bytes(grid_png(torch.rand(4, 1, 16, 16), nrow=2))
    rows = [
        {"label": "a", "uncond": {"bg": {"abs": 0.5}, "ffid": 999.0, "n_steps_each": 10}},  # superseded by the next
        {"label": "a", "uncond": {"bg": {"abs": 0.0123}, "ffid": 91.64, "n_steps_each": 10},
         "reference": {"target_bg": {"abs": 0.002}, "ffid_floor": 64.3}},
        {"label": "b", "uncond": {"bg": {"abs": 0.0048}, "ffid": 80.0, "n_steps_each": 10}},
    ]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "fig.png"
    script = Path(__file__).resolve().parents[1] / "scripts" / "digits_score_figure.py"
    monkeypatch.setattr(sys, "argv", [str(script), "a=before", "b=after", "--dir", str(tmp_path), "--out", str(out)])
    runpy.run_path(str(script), run_name="__main__")
    caption = capsys.readouterr().out
    assert "left, before: bg 0.012, feature FID 91.6" in caption
    assert "right, after: bg 0.005, feature FID 80.0" in caption
    assert "target images: bg 0.002, feature FID floor 64.3" in caption
    w, h = Image.open(out).size
    assert w >= 2 * Image.open(tmp_path / "a.png").size[0] and h > Image.open(tmp_path / "a.png").size[1]
    # LABEL@K: the run's --oracle-levels chains (empirical mixture below level K), grid <label>_oracle<K>.png
    rows.append({"label": "c", "uncond": {"bg": {"abs": 0.005}, "ffid": 96.1, "n_steps_each": 10, "confident": 0.61},
                 "oracle": [{"K": 5, "ffid": 65.61, "confident": 0.9}],
                 "reference": {"target_bg": {"abs": 0.002}, "ffid_floor": 64.3, "confident": 0.94}})
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("c", "c_oracle5"):
        (tmp_path / f"{name}.png").write_bytes(grid_png(torch.rand(4, 1, 16, 16), nrow=2))
    monkeypatch.setattr(sys, "argv", [str(script), "c=learned", "c@5=mixture above", "--dir", str(tmp_path),
                                      "--out", str(out)])
    runpy.run_path(str(script), run_name="__main__")
    caption = capsys.readouterr().out
    assert "left, learned: bg 0.005, feature FID 96.1, confident 0.61" in caption
    assert "right, mixture above: feature FID 65.6, confident 0.90" in caption
    assert "feature FID floor 64.3, confident 0.94" in caption
    monkeypatch.setattr(sys, "argv", [str(script), "c@3=x", "--dir", str(tmp_path), "--out", str(out)])
    with pytest.raises(SystemExit, match="no --oracle-levels result for K = 3"):
        runpy.run_path(str(script), run_name="__main__")
    monkeypatch.setattr(sys, "argv", [str(script), "missing=x", "--dir", str(tmp_path), "--out", str(out)])
    with pytest.raises(SystemExit, match="no result labelled 'missing'"):
        runpy.run_path(str(script), run_name="__main__")
