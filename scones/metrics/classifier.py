"""Digit classifier and the label-consistency metric for digit transport (USPS ↔ MNIST, sklearn digits).

Label consistency of conditional samples y ~ π̂(·|x) (one or several per source image x with digit label ℓ(x)):

    LC = (1/#samples) Σ 1[ argmax_k classifier(y)_k = ℓ(x) ],

where the classifier is trained on the *target* image set. Chance level is ≈ 0.1 for 10 balanced digits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DigitClassifier(nn.Module):
    """Small CNN for grey digits ``(n, C, H, W)`` in [0, 1] (any H, W ≥ 4): logits ``(n, num_classes)``.

    conv3×3(C→w) → ReLU → conv3×3(w→2w) → ReLU → 2×2 max-pool → adaptive mean-pool to 4×4 → flatten
    → dropout → linear(32w→num_classes); inputs are mapped to 2x − 1. :meth:`embed` gives the penultimate
    features (the 32w inputs of the linear head), ``num_features`` their number: the feature space of the
    offline image-quality metric (:mod:`scones.metrics.feature_distance`).
    """

    def __init__(
        self, channels: int = 1, num_classes: int = 10, width: int = 16, dropout: float = 0.2
    ) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(channels, w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * w * 16, num_classes))
        self.num_features = 2 * w * 16

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(2.0 * x - 1.0))

    def embed(self, x: Tensor) -> Tensor:
        """Penultimate features ``(n, num_features)``: the flattened conv features the linear head reads."""
        return self.features(2.0 * x - 1.0).flatten(1)

    @torch.no_grad()
    def predict(self, x: Tensor, batch_size: int = 1024) -> Tensor:
        """Predicted classes ``(n,)`` (evaluation mode, batched; the training mode flag is restored)."""
        was_training = self.training
        self.eval()
        dev = next(self.parameters()).device
        out = torch.cat([self(chunk.to(dev)).argmax(1).cpu() for chunk in x.split(batch_size)])
        self.train(was_training)
        return out


def train_digit_classifier(
    images: Tensor,
    labels: Tensor,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 3e-3,
    width: int = 16,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> DigitClassifier:
    """Fit a :class:`DigitClassifier` with Adam + cross-entropy on ``images (N, C, H, W)``, ``labels (N,)``.

    A cosine learning-rate decay over ``epochs`` passes; deterministic given ``seed``. On the sklearn 8×8
    digits (1 200 for training) the defaults take ≈ 2–3 s on one CPU core and reach ≈ 97 % held-out accuracy.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # weight init and dropout
    num_classes = int(labels.max()) + 1
    model = DigitClassifier(images.shape[1], max(num_classes, 10), width).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = images.shape[0]
    steps = epochs * ((n + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    x_all, y_all = images.float().to(device), labels.long().to(device)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(device)
        for idx in perm.split(batch_size):
            loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model


def label_consistency(classifier: nn.Module, samples: Tensor, source_labels: Tensor) -> float:
    """Share of samples classified as their source's digit.

    Args:
        classifier: module returning logits (e.g. :class:`DigitClassifier`).
        samples: ``(n, C, H, W)`` (one sample per source) or ``(n, k, C, H, W)`` (k samples per source).
        source_labels: ``(n,)`` digit labels of the source images.
    """
    n = source_labels.shape[0]
    if samples.shape[0] != n:
        raise ValueError(f"samples has {samples.shape[0]} rows but source_labels has {n}")
    k = samples.shape[1] if samples.ndim == 5 else 1
    flat = samples.reshape(n * k, *samples.shape[-3:])
    if isinstance(classifier, DigitClassifier):
        pred = classifier.predict(flat)
    else:
        with torch.no_grad():
            pred = classifier(flat).argmax(1).cpu()
    return float((pred == source_labels.cpu().repeat_interleave(k)).float().mean())


__all__ = ["DigitClassifier", "label_consistency", "train_digit_classifier"]
