"""Recurrent models for the zoo: stacked / bidirectional LSTM and GRU, and a CRNN text recogniser
(conv front end -> BiLSTM -> linear), as people build them in torch."""
from __future__ import annotations

import torch
import torch.nn as nn


class RecurrentNet(nn.Module):
    """Sequence tagger, batch first (the exporters' dynamic axis): [N, T, features] -> [N, T, classes]."""

    def __init__(self, cell: str = "lstm", features: int = 10, hidden: int = 12, layers: int = 2,
                 bidirectional: bool = True, classes: int = 5):
        super().__init__()
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[cell]
        self.embed = nn.Linear(features, 16)
        self.rnn = rnn(16, hidden, num_layers=layers, bidirectional=bidirectional, batch_first=True)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), classes)

    def forward(self, x):
        y, _ = self.rnn(torch.relu(self.embed(x)))
        return self.head(y)


class CRNN(nn.Module):
    """Conv feature extractor over an image line [N, 1, H, W] -> BiLSTM over W -> per-column classes."""

    def __init__(self, height: int = 8, channels: int = 8, hidden: int = 12, classes: int = 6):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.MaxPool2d((2, 1)),
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.BatchNorm2d(2 * channels), nn.ReLU(),
            nn.MaxPool2d((height // 2, 1)),
        )
        self.rnn = nn.LSTM(2 * channels, hidden, num_layers=2, bidirectional=True)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, x):
        f = self.conv(x).squeeze(2).permute(2, 0, 1)  # [W, N, C]
        y, _ = self.rnn(f)
        return self.head(y)


class AudioNet(nn.Module):
    """Conv1d front end over a waveform [N, 1, L] -> GRU over time -> per-frame classes."""

    def __init__(self, channels: int = 8, hidden: int = 12, classes: int = 4):
        super().__init__()
        self.front = nn.Sequential(
            nn.Conv1d(1, channels, 5, stride=2, padding=2), nn.BatchNorm1d(channels), nn.ReLU(),
            nn.Conv1d(channels, 2 * channels, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.rnn = nn.GRU(2 * channels, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        y, _ = self.rnn(self.front(x).transpose(1, 2))  # [N, frames, C]
        return self.head(y)


def sequence_models():
    """name -> (module factory, example input)."""
    return {
        "lstm": (lambda: RecurrentNet("lstm"), torch.randn(2, 7, 10)),
        "gru": (lambda: RecurrentNet("gru"), torch.randn(2, 7, 10)),
        "rnn": (lambda: RecurrentNet("rnn", bidirectional=False), torch.randn(2, 7, 10)),
        "crnn": (lambda: CRNN(), torch.randn(2, 1, 8, 12)),
        "audio": (lambda: AudioNet(), torch.randn(2, 1, 64)),
    }
