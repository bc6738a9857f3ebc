#!/usr/bin/env bash
# One prepared accelerator check (< 8 minutes on one H200): prints one JSON object on stdout
# (progress on stderr). See bench/device_check.py for the parts.
#
#   bash bench/device_check.sh                         # on the GPU machine, from the repo root
#   DEVICE_CHECK_TINY=1 bash bench/device_check.sh     # dry run at tiny shapes (any machine, CPU too)
#
# Needs nothing from a network: it uses the machine's own python3 with its JAX (the device image
# has jax + the CUDA plugin, flax, optax, scipy; `pip install jax[cuda]` is neither needed nor
# possible there). PYTHON overrides the interpreter; PYTHONPATH may add carried wheels.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
# JAX would take 75% of the GPU up front; let it grow so peak_bytes_in_use is what the run needs
# and the 70B-shaped stack (38 GB bf16 + 21 GB of Grams) is not refused by a preallocation.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
missing=$("$PY" - <<'PYEOF'
import importlib.util as u
print(" ".join(m for m in ("jax", "flax", "optax", "scipy", "numpy") if u.find_spec(m) is None))
PYEOF
)
if [ -n "$missing" ]; then
  echo "{\"error\": \"$PY lacks: $missing (carry them as wheels, see /work/.library/device/README.md)\"}"
  exit 2
fi
if [ "${DEVICE_CHECK_TINY:-0}" != "1" ]; then
  "$PY" -c "import jax, sys; sys.exit(0 if jax.default_backend() != 'cpu' else 1)" || {
    echo '{"error": "JAX sees no accelerator here (jax.default_backend() is cpu)"}'; exit 2; }
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 2>/dev/null || true
# The parts stop themselves at DEVICE_CHECK_DEADLINE_S (default 420 s); timeout is the backstop.
exec timeout --signal=TERM 470 "$PY" bench/device_check.py "$@"
