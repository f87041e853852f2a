# vgg-gluon: every target installs what it needs (venv, pinned packages, data) on a fresh clone.
#   make train                       Fashion-MNIST, fast3 at half width, airbench94 techniques (experiments/fashion_mnist.yaml)
#   make train DATASET=cifar10       the same techniques on CIFAR-10 (experiments/cifar10.yaml;
#                                    experiments/cifar10_amx.yaml on a CPU with AMX)
#   make resume RUN=checkpoints/<run> [EPOCHS=N]
#   make evaluate RUN=checkpoints/<run> [WHICH=best|last]
#   make test                        fast tests; CI=true (or SLOW=1) adds the slow end-to-end runs
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON   ?= $(shell command -v python3.11 || command -v python3)
VENV     ?= .venv
GPU      ?=
EXTRAS   := $(if $(GPU),gpu,cpu),dev
BIN      := $(VENV)/bin
PY       := $(BIN)/python
CLI      := $(BIN)/vgg-gluon

DATASET  ?= fashion_mnist
# CIFAR-10 on a CPU with AMX that Linux lets us use (Intel Xeon since Sapphire Rapids): its
# bfloat16 recipe, 28 epochs in less time than float32 takes for the default's 14 (more accurate;
# benchmarks/README.md, ninth and tenth sessions). CONFIG=experiments/cifar10.yaml keeps float32.
# Checked only when used, with the system Python (no venv or MXNet needed).
AMX       = $(shell $(PYTHON) vgg_gluon/_env.py amx 2>/dev/null)
CONFIG   ?= experiments/$(subst -,_,$(DATASET))$(if $(filter cifar10,$(DATASET)),$(if $(AMX),_amx)).yaml
DATA_DIR ?= data
EPOCHS   ?=
CTX      ?=
RUN      ?=
WHICH    ?= best
ARGS     ?=
# Offline source of CIFAR-10 (image-folder JPEG copy); online, the official binary is downloaded.
CIFAR10_ARCHIVE ?= ../shared/datasets/cifar10-jpeg.tar.gz
FASHION_MNIST_SYSTEM := /usr/share/datasets/fashion-mnist

export VGG_GLUON_DATA_DIR := $(abspath $(DATA_DIR))

OPT_EPOCHS := $(if $(EPOCHS),--epochs $(EPOCHS))
OPT_CTX    := $(if $(CTX),--ctx $(CTX))

.PHONY: help setup venv data data-fashion-mnist data-cifar10 train resume evaluate test lint bench clean

help:
	@sed -n '2,/^[^#]/{/^#/p}' Makefile | sed 's/^# \{0,1\}//'

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade -c constraints.txt pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[$(EXTRAS)]'
	touch $@

setup: venv data

data: data-fashion-mnist data-cifar10

# Debian's package holds the original Fashion-MNIST files; without root or apt the
# program downloads and verifies them on first use instead.
data-fashion-mnist:
	@if [ ! -f $(FASHION_MNIST_SYSTEM)/train-images-idx3-ubyte.gz ] && [ ! -f $(DATA_DIR)/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "Installing Debian package dataset-fashion-mnist"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
	      || echo "apt-get failed; Fashion-MNIST will be downloaded on first use"; \
	  else echo "Fashion-MNIST not installed; it will be downloaded on first use"; fi; \
	fi

data-cifar10: venv
	@if [ -f "$(CIFAR10_ARCHIVE)" ]; then \
	  $(CLI) data cifar10 --data-dir $(DATA_DIR) --from-archive "$(CIFAR10_ARCHIVE)"; \
	else \
	  $(CLI) data cifar10 --data-dir $(DATA_DIR); \
	fi

train: venv $(if $(filter cifar10,$(DATASET)),data-cifar10,data-fashion-mnist)
	@$(if $(and $(filter file,$(origin CONFIG)),$(filter %_amx.yaml,$(CONFIG))),echo "this CPU has AMX: $(CONFIG) trains in bfloat16 (CONFIG=experiments/cifar10.yaml for float32)")
	$(CLI) train --config $(CONFIG) $(OPT_EPOCHS) $(OPT_CTX) $(ARGS)

resume: venv
	@test -n "$(RUN)" || { echo "usage: make resume RUN=checkpoints/<run> [EPOCHS=N]"; exit 2; }
	$(CLI) resume $(RUN) $(OPT_EPOCHS) $(OPT_CTX) $(ARGS)

evaluate: venv
	@test -n "$(RUN)" || { echo "usage: make evaluate RUN=checkpoints/<run> [WHICH=best|last]"; exit 2; }
	$(CLI) evaluate $(RUN) --which $(WHICH) $(OPT_CTX) $(ARGS)

# CI=true runs the slow end-to-end tests too; they need the real data sets.
test: venv $(if $(or $(filter true,$(CI)),$(SLOW)),data,)
	$(PY) -m pytest $(if $(or $(filter true,$(CI)),$(SLOW)),,-m "not slow") $(ARGS)

lint: venv
	$(BIN)/ruff check vgg_gluon tests benchmarks

# Throughput vs PyTorch (benchmarks/README.md); BENCH=tta|memory|syncs|threads|levers|onednn|peak for the others.
# BENCH=tta is time to accuracy: ARGS="--config experiments/cifar10.yaml --seeds 0,1,2" (benchmarks/tta.py).
# BENCH=airbench runs the reference airbench94 (PyPI, PyTorch) on this CIFAR-10 copy: ARGS="--seed 0 [--width 0.5]".
bench: venv $(if $(filter tta airbench,$(BENCH)),data,data-fashion-mnist)
	$(MAKE) -C benchmarks $(or $(BENCH),throughput) PYTHON=$(PYTHON) ARGS='$(ARGS)'

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
