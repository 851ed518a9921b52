"""Image datasets of the SCONES experiments, exposed as :class:`~scones.data.distributions.Distribution` s.

Every image is a float32 tensor ``(C, H, W)`` in [0, 1] (no rescaling; networks map to 2x − 1 themselves).
``sample(n, generator=None, return_labels=False)`` draws ``n`` images uniformly *with replacement* from the
(empirical) image set, i.e. the measure is (1/N) Σ_i δ_{image_i}; optional random horizontal flips are
applied per draw.

Preprocessing (scones.md §5c, §5d):

================  ====================================================================================
``USPSImages``    torchvision USPS (train split: 7 291 images, native 16×16 grey)
``MNISTImages``   torchvision MNIST (train: 60 000) resized 28 → ``size`` (16) bilinear with antialiasing
``DigitsImages``  sklearn ``load_digits`` (1 797 real 8×8 digits, offline; values 0..16 → /16)
``CelebAImages``  aligned CelebA, CenterCrop(140) → Resize(``resolution``) (PIL bilinear) → random h-flip
================  ====================================================================================

Super-resolution *source* measures: ``downsample=k`` replaces every image by itself resized to
``H/k × W/k`` and back to ``H × W`` (bilinear; for CelebA 64 px with k = 2 this is the paper's
CenterCrop(140) → Resize(32) → Resize(64) "CELEBA-32px" source). Source and target of a super-resolution
pair are built from the same image set; ``subset="even"``/``"odd"`` keep the even / odd positions of the
split so that the two sides can be made disjoint (the 2022 revision of the paper's code does this).

On-disk layout under ``root`` (default ``$SCONES_DATA`` or ``./data``), the same as torchvision's::

    root/usps.bz2, root/usps.t.bz2                                    (USPS train / test)
    root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte       (MNIST, uncompressed IDX)
    root/celeba/img_align_celeba/*.jpg, root/celeba/list_eval_partition.txt   (CelebA)

A missing dataset raises :class:`DatasetNotFoundError` naming the directory, the files and the command
``python scripts/prepare_data.py NAME --root DIR`` (or pass ``download=True``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from scones.data.distributions import Distribution

SUBSETS = ("all", "even", "odd")


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing; the message says where they are expected and how to fetch them."""

    def __init__(self, name: str, directory: str | Path, missing: Sequence[str], hint: str = "") -> None:
        self.name, self.directory, self.missing = name, str(directory), list(missing)
        files = "\n".join(f"  - {m}" for m in self.missing)
        root = Path(directory)
        msg = (
            f"{name} dataset not found in directory '{root}'. Missing:\n{files}\n"
            f"Fetch it with:  python scripts/prepare_data.py {name.lower()} --root {root}\n"
            f"(or construct the dataset with download=True)."
        )
        super().__init__(msg + (f"\n{hint}" if hint else ""))


def data_root(root: str | os.PathLike | None = None) -> Path:
    """``root`` if given, else ``$SCONES_DATA``, else ``./data``."""
    return Path(root if root is not None else os.environ.get("SCONES_DATA", "data")).expanduser()


def _require(name: str, root: Path, files: Sequence[str], hint: str = "") -> None:
    missing = [f for f in files if not (root / f).exists()]
    if missing:
        raise DatasetNotFoundError(name, root, missing, hint)


def _check_subset(subset: str) -> None:
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")


def _subset_index(n: int, subset: str) -> np.ndarray:
    _check_subset(subset)
    idx = np.arange(n)
    return idx if subset == "all" else idx[(0 if subset == "even" else 1) :: 2]


def resize_images(images: Tensor, size: int | Sequence[int]) -> Tensor:
    """Bilinear resize of a batch ``(n, C, H, W)`` (antialiased when shrinking, like PIL)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(images.shape[-2:]) == size:
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def lowres(images: Tensor, factor: int) -> Tensor:
    """Super-resolution source: resize ``(n, C, H, W)`` to ``(H/factor, W/factor)`` and back (clamped)."""
    if factor == 1:
        return images
    h, w = images.shape[-2:]
    if factor < 1 or h % factor or w % factor:
        raise ValueError(f"downsample factor {factor} must be a positive divisor of the image size {h}×{w}")
    return resize_images(resize_images(images, (h // factor, w // factor)), (h, w)).clamp(0.0, 1.0)


def _random_flip(images: Tensor, generator: torch.Generator | None) -> Tensor:
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


class ImageTensorDistribution(Distribution):
    """Empirical measure of in-memory images ``(N, C, H, W)`` in [0, 1], with optional labels ``(N,)``.

    ``sample(n, generator, return_labels)`` draws indices uniformly with replacement; with
    ``random_flip=True`` each drawn image is mirrored horizontally with probability ½.
    """

    def __init__(self, images: Tensor, labels: Tensor | None = None, random_flip: bool = False) -> None:
        images = torch.as_tensor(images, dtype=torch.float32)
        if images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.long)
            if labels.shape != (images.shape[0],):
                raise ValueError(f"labels must be ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images, self.labels, self.random_flip = images.contiguous(), labels, bool(random_flip)
        self.dim = int(np.prod(images.shape[1:]))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def sample(
        self, n: int, generator: torch.Generator | None = None, return_labels: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        idx = torch.randint(0, len(self), (n,), generator=generator)
        out = self.images[idx]
        if self.random_flip:
            out = _random_flip(out, generator)
        if not return_labels:
            return out
        if self.labels is None:
            raise ValueError(f"{type(self).__name__} has no labels")
        return out, self.labels[idx]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={len(self)}, shape={self.shape}, random_flip={self.random_flip})"


def _finish(images: Tensor, labels: Tensor, subset: str, downsample: int) -> tuple[Tensor, Tensor]:
    keep = torch.as_tensor(_subset_index(images.shape[0], subset))
    return lowres(images[keep], downsample), labels[keep]


class USPSImages(ImageTensorDistribution):
    """USPS digits, native 16×16 grey, in [0, 1] (torchvision's libsvm ``usps.bz2`` / ``usps.t.bz2``).

    Args:
        root: data root holding ``usps.bz2`` (train) / ``usps.t.bz2`` (test).
        train: train split (7 291 images, the paper's) or test split (2 007).
        download: fetch the file with torchvision if missing (needs internet).
        downsample: super-resolution source factor (1 = clean images).
        subset: ``"all"``, ``"even"`` or ``"odd"`` positions of the split.
        random_flip: random horizontal flips at sampling time.
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        train: bool = True,
        download: bool = False,
        downsample: int = 1,
        subset: str = "all",
        random_flip: bool = False,
    ) -> None:
        from torchvision.datasets import USPS

        root = data_root(root)
        _check_subset(subset)
        if not download:
            _require("USPS", root, ["usps.bz2" if train else "usps.t.bz2"])
        ds = USPS(str(root), train=train, download=download)
        images = torch.as_tensor(np.asarray(ds.data), dtype=torch.float32)[:, None] / 255.0
        labels = torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)
        super().__init__(*_finish(images, labels, subset, downsample), random_flip=random_flip)


MNIST_RAW_FILES = [
    "MNIST/raw/train-images-idx3-ubyte",
    "MNIST/raw/train-labels-idx1-ubyte",
    "MNIST/raw/t10k-images-idx3-ubyte",
    "MNIST/raw/t10k-labels-idx1-ubyte",
]


class MNISTImages(ImageTensorDistribution):
    """MNIST digits resized 28 → ``size`` (bilinear, antialiased ≈ PIL), in [0, 1].

    Args:
        root: data root holding ``MNIST/raw/*-ubyte`` (all four uncompressed IDX files, torchvision layout).
        train: train (60 000) or test (10 000) split.
        size: output side length (paper: 16).
        download, downsample, subset, random_flip: as in :class:`USPSImages`.
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        train: bool = True,
        size: int = 16,
        download: bool = False,
        downsample: int = 1,
        subset: str = "all",
        random_flip: bool = False,
    ) -> None:
        from torchvision.datasets import MNIST

        root = data_root(root)
        _check_subset(subset)
        legacy = root / "MNIST" / "processed" / ("training.pt" if train else "test.pt")
        if not download and not legacy.exists():
            _require("MNIST", root, MNIST_RAW_FILES)
        ds = MNIST(str(root), train=train, download=download)
        raw = ds.data[:, None]
        images = torch.cat([resize_images(c.float() / 255.0, size) for c in raw.split(10_000)]).clamp(
            0.0, 1.0
        )
        super().__init__(*_finish(images, ds.targets.long(), subset, downsample), random_flip=random_flip)


class DigitsImages(ImageTensorDistribution):
    """Real handwritten digits from scikit-learn (``load_digits``: 1 797 images 8×8, shipped in the wheel).

    Pixel values 0..16 are divided by 16. ``size`` ≠ 8 resizes bilinearly (e.g. 16 for the 16 px nets).
    ``downsample=2`` gives the super-resolution source (8×8 → 4×4 → 8×8). Labels (0–9) are kept for
    label-consistency metrics (``sample(n, return_labels=True)``).
    """

    def __init__(
        self, size: int = 8, downsample: int = 1, subset: str = "all", random_flip: bool = False
    ) -> None:
        images, labels = load_digits_tensors(size)
        super().__init__(*_finish(images, labels, subset, downsample), random_flip=random_flip)


def load_digits_tensors(size: int = 8) -> tuple[Tensor, Tensor]:
    """sklearn digits as ``(images (1797, 1, size, size) in [0, 1], labels (1797,))``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0
    return resize_images(images, size).clamp(0.0, 1.0), torch.as_tensor(bunch.target, dtype=torch.long)


CELEBA_SPLITS = {"train": 0, "valid": 1, "test": 2, "all": None}
CELEBA_FILES = ["celeba/img_align_celeba", "celeba/list_eval_partition.txt"]
CELEBA_HINT = (
    "CelebA is hosted on Google Drive; if the automatic download fails, download 'img_align_celeba.zip' and "
    "'list_eval_partition.txt' from https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html "
    "(Aligned&Cropped images, Eval/ partition) and unzip them into <root>/celeba/."
)


class CelebAImages(Dataset, Distribution):
    """Aligned CelebA as a torch ``Dataset`` and a :class:`Distribution` (images read from disk on demand).

    Pipeline per image (PIL): RGB → CenterCrop(``crop``) → [Resize(resolution/downsample)] →
    Resize(``resolution``) → ToTensor, bilinear resizing; random horizontal flip with probability ½ if
    ``random_flip``. Only ``img_align_celeba/*.jpg`` and ``list_eval_partition.txt`` (lines ``name split``,
    split 0/1/2 = train/valid/test) are read; no checksums.

    ``dataset[i]`` returns one image ``(3, R, R)`` (flip from torch's global RNG);
    ``sample(n, generator)`` draws ``n`` random indices and returns ``(n, 3, R, R)``.
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "train",
        resolution: int = 64,
        downsample: int = 1,
        subset: str = "all",
        random_flip: bool = True,
        crop: int = 140,
        download: bool = False,
    ) -> None:
        root = data_root(root)
        if split not in CELEBA_SPLITS:
            raise ValueError(f"split must be one of {list(CELEBA_SPLITS)}, got {split!r}")
        _check_subset(subset)
        if resolution % downsample:
            raise ValueError(f"downsample={downsample} must divide resolution={resolution}")
        if download:
            download_celeba(root)
        _require("CelebA", root, CELEBA_FILES, CELEBA_HINT)
        self.folder = root / "celeba" / "img_align_celeba"
        names, splits = _read_partition(root / "celeba" / "list_eval_partition.txt")
        code = CELEBA_SPLITS[split]
        names = names if code is None else names[splits == code]
        self.filenames = names[_subset_index(len(names), subset)]
        if len(self.filenames) == 0:
            raise ValueError(f"CelebA split={split!r}, subset={subset!r} is empty in {root}")
        self.resolution, self.downsample, self.crop = int(resolution), int(downsample), int(crop)
        self.random_flip = bool(random_flip)
        self.dim = 3 * self.resolution**2

    @property
    def shape(self) -> tuple[int, ...]:
        return (3, self.resolution, self.resolution)

    def __len__(self) -> int:
        return len(self.filenames)

    def load(self, index: int) -> Tensor:
        """Image ``index`` after crop and resizing, without flip: ``(3, R, R)`` in [0, 1]."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        with Image.open(self.folder / self.filenames[index]) as im:
            img = TF.center_crop(im.convert("RGB"), [self.crop, self.crop])
        r = self.resolution
        if self.downsample > 1:
            img = TF.resize(img, [r // self.downsample] * 2, interpolation=InterpolationMode.BILINEAR)
        img = TF.resize(img, [r, r], interpolation=InterpolationMode.BILINEAR)
        return TF.to_tensor(img)

    def __getitem__(self, index: int) -> Tensor:
        img = self.load(index)
        if self.random_flip and bool(torch.rand(()) < 0.5):
            img = img.flip(-1)
        return img

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        idx = torch.randint(0, len(self), (n,), generator=generator)
        out = torch.stack([self.load(int(i)) for i in idx])
        return _random_flip(out, generator) if self.random_flip else out

    def __repr__(self) -> str:
        return (
            f"CelebAImages(n={len(self)}, resolution={self.resolution}, downsample={self.downsample}, "
            f"random_flip={self.random_flip})"
        )


def _read_partition(path: Path) -> tuple[np.ndarray, np.ndarray]:
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    bad = [r for r in rows if len(r) != 2 or not r[1].isdigit()]
    if bad:
        raise ValueError(f"{path}: expected lines '<image>.jpg <0|1|2>', got {' '.join(bad[0])!r}")
    return np.array([r[0] for r in rows]), np.array([int(r[1]) for r in rows])


def download_celeba(root: str | os.PathLike) -> None:
    """Fetch aligned CelebA into ``root/celeba`` with torchvision (Google Drive, needs ``gdown``)."""
    root = Path(root)
    if all((root / f).exists() for f in CELEBA_FILES):
        return
    try:
        import gdown  # noqa: F401
    except ModuleNotFoundError as err:
        raise RuntimeError(f"Downloading CelebA needs `pip install gdown`.\n{CELEBA_HINT}") from err
    from torchvision.datasets import CelebA

    try:
        CelebA(str(root), split="all", target_type=[], download=True)
    except Exception as err:  # gdrive quota / network errors come in many types
        raise RuntimeError(f"CelebA download failed ({err}).\n{CELEBA_HINT}") from err


__all__ = [
    "CelebAImages",
    "DatasetNotFoundError",
    "DigitsImages",
    "ImageTensorDistribution",
    "MNISTImages",
    "USPSImages",
    "data_root",
    "load_digits_tensors",
    "lowres",
    "resize_images",
]
