"""Download the image datasets of the SCONES experiments into a data root (needs internet).

    python scripts/prepare_data.py usps   --root data
    python scripts/prepare_data.py mnist  --root data
    python scripts/prepare_data.py celeba --root data   # Google Drive via gdown; manual route below
    python scripts/prepare_data.py all    --root data

Layout written (torchvision's, read by :mod:`scones.data.images`)::

    data/usps.bz2, data/usps.t.bz2
    data/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte
    data/celeba/img_align_celeba/*.jpg, data/celeba/list_eval_partition.txt (+ the other annotation files)

CelebA manual route (when Google Drive refuses: quota, no ``gdown``): download ``img_align_celeba.zip`` and
``list_eval_partition.txt`` from https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html ("Align&Cropped Images"
and "Eval" folders), unzip the images to ``<root>/celeba/img_align_celeba/`` and put the txt file in
``<root>/celeba/``. The sklearn digits need no download (shipped with scikit-learn).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scones.data.images import CELEBA_HINT, CelebAImages, MNISTImages, USPSImages


def prepare(name: str, root: Path) -> str:
    """Download ``name`` into ``root`` (no-op if present) and return a one-line summary."""
    if name == "usps":
        sizes = [len(USPSImages(root, train=train, download=True)) for train in (True, False)]
        return f"USPS: {sizes[0]} train / {sizes[1]} test images in {root}"
    if name == "mnist":
        sizes = [len(MNISTImages(root, train=train, download=True)) for train in (True, False)]
        return f"MNIST: {sizes[0]} train / {sizes[1]} test images in {root / 'MNIST'}"
    if name == "celeba":
        ds = CelebAImages(root, split="all", download=True)
        return f"CelebA: {len(ds)} aligned images in {root / 'celeba'}"
    raise ValueError(f"unknown dataset {name!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dataset", choices=["usps", "mnist", "celeba", "all"])
    parser.add_argument("--root", type=Path, default=Path("data"), help="data root (default: ./data)")
    args = parser.parse_args(argv)
    names = ["usps", "mnist", "celeba"] if args.dataset == "all" else [args.dataset]
    failed = False
    for name in names:
        try:
            print(prepare(name, args.root))
        except Exception as err:  # report every dataset, then fail
            failed = True
            print(f"{name}: download failed: {err}", file=sys.stderr)
            if name == "celeba" and CELEBA_HINT not in str(err):
                print(CELEBA_HINT, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
