# Every entry point in one place. `make demo` and `make test` are the README's two commands.
SHARED ?= ../shared
PY := .venv/bin/python
VITRINE := .venv/bin/vitrine
# Offline copies of the models when ../shared has them; otherwise the hub defaults
# (sentence-transformers/all-mpnet-base-v2 and OpenCLIP ViT-B-32, downloaded on first use).
# On the CPU backends `vitrine bench encoders` measured fastest and faithful (README, Fast
# encoders): MiniLM and MobileNetV2 on ONNX Runtime, fp32.
ifneq ($(wildcard $(SHARED)/models/all-MiniLM-L6-v2/modules.json),)
export VITRINE_TEXT_MODEL ?= $(abspath $(SHARED)/models/all-MiniLM-L6-v2)+onnx
export VITRINE_IMAGE_MODEL ?= torchvision:mobilenet_v2@$(abspath $(SHARED)/models/mobilenet_v2_imagenet/model.safetensors)+onnx
endif
DATA ?= $(if $(wildcard $(SHARED)/data/flipkart-1050),$(SHARED)/data/flipkart-1050,data/flipkart)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo batch-demo data test test-fast check bench clean

setup: .venv/.installed

# PyPI's x86_64 torch wheels are CUDA builds (~6 GB with their nvidia-* wheels): without an
# NVIDIA GPU, take torch==X+cpu from PyTorch's CPU index when it answers within 3 s.
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
.venv/.installed: pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	@if ! command -v nvidia-smi >/dev/null 2>&1 && curl -fs -m 3 -o /dev/null $(TORCH_CPU_INDEX)/; \
	then echo "setup: no NVIDIA GPU: CPU-only torch from $(TORCH_CPU_INDEX)"; \
	  extra="--extra-index-url $(TORCH_CPU_INDEX)"; \
	else echo "setup: torch from PyPI (NVIDIA GPU found, or the PyTorch CPU index unreachable)"; \
	fi; \
	.venv/bin/pip install -q $$extra -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import torch, torchvision, faiss, open_clip, timm, sentence_transformers"
	touch $@

HOST ?= 127.0.0.1
PORT ?= 8000

# The product on embedded defaults: the HTTP API with in-process ingestion (no Redis),
# its index seeded with the demo catalog on the first run; state in var/ (VITRINE_DATA_DIR).
demo: setup data
	$(VITRINE) serve --catalog $(DATA)/flipkart_com-ecommerce_sample_1050.csv --host $(HOST) --port $(PORT)

# The batch CLI on the same catalog: index, categorize every row, search.
batch-demo: setup data
	$(VITRINE) index --catalog $(DATA)/flipkart_com-ecommerce_sample_1050.csv --index var/batch-index --force
	$(VITRINE) predict $(DATA)/flipkart_com-ecommerce_sample_1050.csv --index var/batch-index --output var/predictions.csv
	$(VITRINE) search --index var/batch-index --text "analog wrist watch for men" -k 5

data:
	@test -f $(DATA)/flipkart_com-ecommerce_sample_1050.csv || $(VITRINE) fetch-data --out $(DATA)

test: setup
	VITRINE_TEST_SHARED=$(abspath $(SHARED)) $(PY) -m pytest

# What needs neither the models nor a service process: about a minute (CI runs everything)
test-fast: setup
	VITRINE_TEST_SHARED=$(abspath $(SHARED)) $(PY) -m pytest -m "not slow"

check: setup
	.venv/bin/ruff check indexer workers services evaluation vitrine tests
	.venv/bin/mypy

bench: setup
	$(VITRINE) bench core --data $(DATA) --out var/bench-core.json

clean:
	rm -rf var .pytest_cache
