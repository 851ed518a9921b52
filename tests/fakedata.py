"""Writers of small fake dataset trees in the exact on-disk formats torchvision expects (ecosystem.md §5).

Each writer returns the arrays it wrote so that tests can compare the loaders' output with the truth.
"""

from __future__ import annotations

import bz2
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def write_fake_usps(
    root: str | Path, n: int = 30, train: bool = True, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``root/usps.bz2`` (``usps.t.bz2``): bz2 libsvm lines ``label 1:v … 256:v``, label 1..10, v ∈ [−1, 1].

    Returns ``(pixels (n, 16, 16) float in [−1, 1], labels (n,) in 0..9)``.
    """
    rng = np.random.default_rng(seed)
    pixels = rng.uniform(-1.0, 1.0, size=(n, 16, 16)).round(6)
    labels = rng.integers(0, 10, size=n)
    lines = []
    for lab, img in zip(labels, pixels, strict=True):
        feats = " ".join(f"{k + 1}:{v:.6f}" for k, v in enumerate(img.ravel()))
        lines.append(f"{lab + 1} {feats}\n")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with bz2.open(root / ("usps.bz2" if train else "usps.t.bz2"), "wt") as f:
        f.writelines(lines)
    return pixels, labels


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = (0x08 << 8) | array.ndim  # 0x08 = unsigned byte; e.g. 0x00000803 for 3-D images
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic))
        f.write(struct.pack(">" + "I" * array.ndim, *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def write_fake_mnist(
    root: str | Path, n_train: int = 40, n_test: int = 10, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``: uncompressed big-endian IDX.

    Images: header ``>IIII`` = (0x00000803, n, 28, 28) + uint8 pixels;
    labels: header ``>II`` = (0x00000801, n) + uint8.
    Returns ``{"train": (images uint8 (n, 28, 28), labels), "test": (...)}``.
    """
    rng = np.random.default_rng(seed)
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        out[split] = (images, labels)
    return out


CELEBA_ATTRS = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
    "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
    "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
    "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()


def celeba_ramp(width: int = 178, height: int = 218, reverse: bool = False) -> np.ndarray:
    """JPEG-friendly test image: grey level rising linearly left → right (0 → 255), (H, W, 3) uint8."""
    ramp = np.linspace(0, 255, width)
    ramp = ramp[::-1] if reverse else ramp
    return np.repeat(np.tile(ramp, (height, 1))[..., None], 3, axis=2).round().astype(np.uint8)


def write_fake_celeba(root: str | Path, splits: tuple[int, ...] = (0, 0, 0, 0, 1, 2)) -> list[str]:
    """``root/celeba``: ``img_align_celeba/NNNNNN.jpg`` (178×218 RGB ramps) and the five annotation files.

    ``list_eval_partition.txt`` has one ``name split`` line per image (0 train, 1 valid, 2 test); the other
    files (identity, bbox, landmarks, attributes) follow the official layout so torchvision's reader (with
    md5 checks disabled) also accepts the tree. Returns the image names.
    """
    base = Path(root) / "celeba"
    (base / "img_align_celeba").mkdir(parents=True, exist_ok=True)
    names = [f"{i + 1:06d}.jpg" for i in range(len(splits))]
    for name in names:
        Image.fromarray(celeba_ramp()).save(base / "img_align_celeba" / name, quality=95)
    n = len(names)
    (base / "list_eval_partition.txt").write_text(
        "".join(f"{m} {s}\n" for m, s in zip(names, splits, strict=True))
    )
    (base / "identity_CelebA.txt").write_text("".join(f"{m} {i + 1}\n" for i, m in enumerate(names)))
    bbox = "image_id x_1 y_1 width height\n" + "".join(f"{m} 10 20 100 120\n" for m in names)
    (base / "list_bbox_celeba.txt").write_text(f"{n}\n{bbox}")
    marks = (
        "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y "
        "leftmouth_x leftmouth_y rightmouth_x rightmouth_y\n"
    )
    marks += "".join(f"{m} 69 109 106 113 77 142 73 152 108 154\n" for m in names)
    (base / "list_landmarks_align_celeba.txt").write_text(f"{n}\n{marks}")
    attrs = " ".join(CELEBA_ATTRS) + "\n" + "".join(f"{m} " + " ".join(["-1"] * 40) + "\n" for m in names)
    (base / "list_attr_celeba.txt").write_text(f"{n}\n{attrs}")
    return names


__all__ = ["celeba_ramp", "write_fake_celeba", "write_fake_mnist", "write_fake_usps"]
