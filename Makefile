# One command to set up and run the demo, one to set up and run the tests (see README).
# Both create (or reuse) a virtual environment in .venv with PyTorch pinned by constraints.txt.
VENV ?= .venv
# Windows (GNU make with Git Bash's sh): Python installs as `python` (`python3` may be the Store's stub) and a
# virtual environment keeps its programs in Scripts/, not bin/
ifeq ($(OS),Windows_NT)
PYTHON ?= python
BIN := $(VENV)/Scripts
else
PYTHON ?= python3
BIN := $(VENV)/bin
endif
PY := $(BIN)/python
STAMP := $(VENV)/.installed
# nnU-Net's U-Nets and (for the tests) nnU-Net itself, without their timm -> torchvision dependency, which
# cannot be imported with CPU PyTorch; what they import is listed in pyproject's nnunet/test extras
NNUNET_NO_DEPS := dynamic-network-architectures==0.4.4 nnunetv2==2.8.1 acvl-utils==0.2.6 batchgenerators==0.25.5 \
	batchgeneratorsv2==0.3.6

.PHONY: setup demo test check-demo clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	$(PY) -m pip install --quiet -c constraints.txt --no-deps $(NNUNET_NO_DEPS)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/xaioverlay demo --out demo-output

test: $(STAMP)
	$(PY) -m pytest

# the report rendering test and the browser tests (Testing/web) need a headless Chromium (installed here when missing)
.PHONY: browser
test: browser
browser:
	sh tools/ensure_chromium.sh

check-demo: $(STAMP)
	$(PY) tools/check_demo_models.py

clean:
	rm -rf $(VENV) demo-output
