"""Shared by the examples: scikit-learn's digits (8x8 images, offline), a small CNN, training."""
from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

from spa.progress import bar


def data(seed: int = 0):
    """(x_train, y_train, x_test, y_test) as tensors; images [N, 1, 8, 8] scaled to [0, 1]."""
    digits = load_digits()
    x = torch.tensor(digits.data.reshape(-1, 1, 8, 8) / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.tensor(np.random.default_rng(seed).permutation(len(y)))
    x, y = x[order], y[order]
    return x[:1400], y[:1400], x[1400:], y[1400:]


class DigitsNet(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(2 * width, 10))

    def forward(self, x):
        return self.head(self.features(x))


def train(model: nn.Module, x, y, epochs: int, lr: float = 3e-3, seed: int = 0) -> list:
    """Adam, batch 64; returns the mean loss of every epoch."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    model.train()
    epochs_bar = bar(range(epochs), desc="training", unit="epoch")
    for _ in epochs_bar:
        order, total = torch.randperm(len(y)), 0.0
        for start in range(0, len(y), 64):
            batch = order[start:start + 64]
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        losses.append(total / len(y))
        epochs_bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, x, y) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def macs(path: str) -> int:
    """Multiply-accumulates of one image through the ONNX model at `path`."""
    import onnx

    from spa.cost import concrete_shapes, macs_by_op
    model = onnx.load(path)
    return int(sum(macs_by_op(model, concrete_shapes(model)).values()))
