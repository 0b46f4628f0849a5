"""models/pitch.py: the CREPE export and the tones it is judged on (bench_quality_real.py --models crepe)."""
import numpy as np
import pytest

from models.pitch import CENTS_PER_BIN, FIRST_BIN_CENTS, FRAME, _export, frame_cents, pitch_agreement, tones


def test_tones_are_normalised_frames_of_their_pitch_drawn_alike_for_a_seed():
    frames, f0 = tones(8, seed=0)
    assert frames.shape == (8, FRAME) and frames.dtype == np.float32
    assert np.allclose(frames.mean(axis=1), 0, atol=1e-5) and np.allclose(frames.std(axis=1), 1, atol=1e-4)
    assert np.array_equal(frames, tones(8, seed=0)[0]) and ((f0 >= 65) & (f0 <= 1000)).all()
    strongest = np.abs(np.fft.rfft(frames, axis=1)).argmax(axis=1) * 16000 / FRAME
    assert (np.abs(np.log2(strongest / f0)) < 0.2).mean() >= 0.5  # mostly the fundamental (falling harmonics)
    assert not np.array_equal(frames, tones(8, seed=0, shifted=True)[0])


def test_pitch_agreement_reads_the_peak_bin_and_counts_within_50_cents():
    bins = np.array([50, 120, 200])
    scores = np.zeros((3, 360))
    scores[np.arange(3), bins] = 1.0
    cents = CENTS_PER_BIN * bins + FIRST_BIN_CENTS
    assert np.allclose(frame_cents(scores), cents)
    f0 = 10 * 2 ** (cents / 1200)
    assert pitch_agreement(scores, scores, f0) == {"pitch_accuracy": 1.0, "agreement": 1.0}
    off = np.roll(scores, 3, axis=1)  # 60 cents higher
    assert pitch_agreement(scores, off, f0) == {"pitch_accuracy": 0.0, "agreement": 0.0}


def small_crepe(torch, path) -> dict:
    """A CREPE state dict with its layers' shapes at small widths (random weights), saved to `path`."""
    widths, state, rng = [1, 8, 4, 4, 4, 4, 8], {}, torch.Generator().manual_seed(0)
    for k in range(1, 7):
        kernel = 512 if k == 1 else 64
        state[f"conv{k}.weight"] = torch.randn(widths[k], widths[k - 1], kernel, 1, generator=rng) * 0.05
        state[f"conv{k}.bias"] = torch.randn(widths[k], generator=rng) * 0.1
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.1), ("running_var", 2.0)):
            state[f"conv{k}_BN.{name}"] = torch.full((widths[k],), value)
        state[f"conv{k}_BN.num_batches_tracked"] = torch.tensor(0)
    state["classifier.weight"] = torch.randn(360, widths[-1] * 4, generator=rng) * 0.1
    state["classifier.bias"] = torch.zeros(360)
    torch.save(state, path)
    return state


def test_the_export_runs_as_the_torch_layers_do(tmp_path):
    torch = pytest.importorskip("torch")
    from models.pitch import _crepe
    from spa.runtime import session

    state = small_crepe(torch, tmp_path / "small.pth")
    _export(str(tmp_path / "small.pth"), str(tmp_path / "small.onnx"))
    frames = tones(3, seed=2)[0]
    expected = _crepe(state).eval()(torch.from_numpy(frames)).detach().numpy()
    got = session(str(tmp_path / "small.onnx"), quiet=True).run(None, {"frames": frames})[0]
    assert got.shape == (3, 360) and np.allclose(got, expected, atol=1e-5)


def test_the_export_prunes_as_the_oracle_says(tmp_path):
    """Its six Conv-ReLU-BatchNorm-MaxPool blocks and the Flatten into the classifier: the pruned export equals
    the original with the removed channels' consumer slices zeroed."""
    torch = pytest.importorskip("torch")
    import onnx

    from oracle import check_exact

    small_crepe(torch, tmp_path / "small.pth")
    _export(str(tmp_path / "small.pth"), str(tmp_path / "small.onnx"))
    check_exact(onnx.load(str(tmp_path / "small.onnx")))
