#!/usr/bin/env bash
# GPU readiness check (issue 17), one script within 8 minutes on one GPU:
#   1. tests   - tests/test_flash_attention.py with the GPU kernels compiled by Triton
#                (QWEN_JAX_TEST_GPU_COMPILED=1; TPU and 8-device tests skip themselves)
#   2. attention - bench/attention.py in bf16 at 2k / 8k / 16k: our Pallas kernel against
#                jax.nn.dot_product_attention(implementation="cudnn"), forward and forward+backward
#   3. train_step - bench/gpu_train_step.py: a Qwen-1.8B-shaped training step, tokens/s and MFU
#                (pallas, cudnn and xla attention, as the time budget allows)
# then a summary: each part ok / failed and the pallas vs cuDNN ratio at 8k.
#
#   bash bench/gpu_check.sh               # on the GPU machine (its image's python3 and jax)
#   bash bench/gpu_check.sh --cpu-smoke   # anywhere: every part on the CPU at tiny shapes,
#                                         # the kernels interpreted (tests/test_gpu_check.py)
#
# Each part runs under its own `timeout` (140 + 100 + 190 s = 7 min 10 s) and one failing does
# not stop the others; the exit code is 0 only when all three passed. Logs, JSON results and
# summary.txt go to ${OUT:-bench/gpu_check_out}/. Wheels in bench/gpu_wheels/ (pure-Python
# packages the GPU image lacks; docs/gpu.md) are installed first into a scratch folder put on
# PYTHONPATH. PYTHON picks the interpreter (default python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

MODE=gpu
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) MODE=cpu ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (expected --cpu-smoke)" >&2; exit 2 ;;
  esac
done

OUT_DIR="${OUT:-$ROOT/bench/gpu_check_out}"
mkdir -p "$OUT_DIR"
PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [[ $MODE == gpu ]]; then
  export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"  # tests/conftest.py would otherwise pick cpu
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
  T_TESTS=140 T_ATTENTION=100 T_TRAIN=190
  RATIO_SEQ=8192
  TESTS=(env QWEN_JAX_TEST_GPU_COMPILED=1 "$PYTHON" -m pytest -q -p no:cacheprovider
         tests/test_flash_attention.py)
  ATTENTION=("$PYTHON" bench/attention.py --seqs 2048,8192,16384 --tokens 32768 --heads 16
             --head-dim 128 --dtype bfloat16 --causal true --iters 10 --impls pallas,jax.nn.dpa
             --json "$OUT_DIR/attention.json")
  TRAIN=("$PYTHON" bench/gpu_train_step.py --impls pallas,cudnn,xla --budget-s 175
         --json "$OUT_DIR/train_step.json")
else
  export JAX_PLATFORMS=cpu
  export QWEN_JAX_PALLAS_BACKEND=gpu  # the Triton kernel, interpreted (the CPU default is TPU's)
  T_TESTS=300 T_ATTENTION=300 T_TRAIN=300
  RATIO_SEQ=128
  TESTS=("$PYTHON" -m pytest -q -p no:cacheprovider tests/test_flash_attention.py
         -k "test_gpu_kernel_float32 and causal_ragged or test_gpu_kernels_lower_to_triton")
  ATTENTION=("$PYTHON" bench/attention.py --seqs "$RATIO_SEQ" --tokens 256 --heads 2
             --head-dim 64 --dtype bfloat16 --causal true --iters 1 --impls pallas,jax.nn.dpa
             --json "$OUT_DIR/attention.json")
  TRAIN=("$PYTHON" bench/gpu_train_step.py --smoke --impls pallas,xla
         --json "$OUT_DIR/train_step.json")
fi
rm -f "$OUT_DIR"/{tests.log,attention.log,attention.json,train_step.log,train_step.json,summary.txt}

echo "== gpu_check ($MODE) in $ROOT, output in $OUT_DIR =="

shopt -s nullglob
wheels=(bench/gpu_wheels/*.whl)
shopt -u nullglob
if (( ${#wheels[@]} )); then
  site="$(mktemp -d)/site"
  echo "installing ${#wheels[@]} carried wheel(s) into $site: ${wheels[*]##*/}"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --disable-pip-version-check --target "$site" "${wheels[@]}"
  export PYTHONPATH="$site:$PYTHONPATH"
fi

# Versions, and the backend this mode needs (a GPU run on a CPU backend measures nothing).
if ! "$PYTHON" - "$MODE" <<'EOF' 2>&1 | tee "$OUT_DIR/versions.txt"; then
import importlib.metadata as md
import platform
import subprocess
import sys

import jax

def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "-"

print(f"python {platform.python_version()} ({sys.executable})")
print("packages: " + ", ".join(f"{n} {version(n)}" for n in (
    "jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax",
    "orbax-checkpoint", "numpy", "triton")))
backend = jax.default_backend()
print(f"jax backend {backend}: {jax.devices()}")
print(f"device kind: {jax.devices()[0].device_kind}")
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    print(f"nvidia-smi: {smi.stdout.strip() or smi.stderr.strip()}")
except (OSError, subprocess.SubprocessError) as err:
    print(f"nvidia-smi: not available ({type(err).__name__})")
want = "gpu" if sys.argv[1] == "gpu" else "cpu"
if backend != want:
    sys.exit(f"gpu_check: jax.default_backend() is {backend!r}, expected {want!r}"
             + (" (run with --cpu-smoke on a machine without a GPU)" if want == "gpu" else ""))
EOF
  echo "gpu_check: FAIL (wrong or no JAX backend; see $OUT_DIR/versions.txt)" >&2
  exit 1
fi

declare -A STATUS
run_part() {  # run_part NAME SECONDS COMMAND...: tee the output, keep going on failure
  local name=$1 seconds=$2
  shift 2
  echo
  echo "== $name (timeout ${seconds} s): $*"
  local start=$SECONDS rc=0
  set +e
  timeout --kill-after=5 "$seconds" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
  rc=${PIPESTATUS[0]}
  set -e
  STATUS[$name]=$rc
  echo "== $name: exit code $rc after $((SECONDS - start)) s"
}

run_part tests "$T_TESTS" "${TESTS[@]}"
run_part attention "$T_ATTENTION" "${ATTENTION[@]}"
run_part train_step "$T_TRAIN" "${TRAIN[@]}"

echo
"$PYTHON" bench/gpu_check_summary.py "$OUT_DIR" --mode "$MODE" --ratio-seq "$RATIO_SEQ" \
  --status "tests=${STATUS[tests]}" --status "attention=${STATUS[attention]}" \
  --status "train_step=${STATUS[train_step]}" --timeout "tests=$T_TESTS" \
  --timeout "attention=$T_ATTENTION" --timeout "train_step=$T_TRAIN"
