#!/usr/bin/env bash
# GPU check, in under 8 minutes on one CUDA GPU: the CUDA tests (pytest marker "cuda") and the CT-scale
# benchmark (tools/benchmark_ct_scale.py) with --device cuda, then with --device cuda --amp; a summary last.
#
#   tools/gpu_check.sh                      # from a clone, on the GPU machine
#   tools/gpu_check.sh --quick              # the benchmark's smoke size (small volume and window)
#   tools/gpu_check.sh --models 2 --methods gradcam,gxi,lrp
#
# Python: $XAIOVERLAY_PYTHON, else the clone's .venv-gpu or .venv, else python3 — the first that imports torch,
# monai, SimpleITK, yaml, pytest and captum. If none does, a venv .venv-gpu is made on top of the system's
# packages (so a CUDA torch installed there is kept) and the missing packages are installed without
# constraints.txt (which pins the CPU torch); that needs the package index. Nothing is installed from the clone:
# the tests and the benchmark import XAIOverlay/ directly.
# Logs and the benchmark's raw rows go to $GPU_CHECK_OUT (default: a new folder under ${TMPDIR:-/tmp}).
# Every step has its own time limit and the whole run stops at 470 s. Exit status: 0 all steps passed,
# 1 a step failed or ran out of time, 2 no CUDA GPU (or no usable Python).
set -u

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TOTAL_S=470          # hard limit for the whole script (8 minutes = 480 s)
TESTS_S=100          # CUDA tests
BENCH_S=170          # CT-scale benchmark, float32
AMP_S=150            # CT-scale benchmark, mixed precision
NEEDED="torch monai SimpleITK yaml pytest captum"

bench_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) bench_args+=(--quick); shift ;;
        --models|--methods)
            [ $# -ge 2 ] || { echo "gpu_check: $1 needs a value, e.g. $1 2" >&2; exit 2; }
            bench_args+=("$1" "$2"); shift 2 ;;
        -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check: unknown option $1 (use --quick, --models LIST, --methods LIST)" >&2; exit 2 ;;
    esac
done

start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT/XAIOverlay${PYTHONPATH:+:$PYTHONPATH}"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

has_everything() {  # $1: a Python; true when it imports every module the check needs
    "$1" - "$NEEDED" >/dev/null 2>&1 <<'EOF'
import importlib, sys
for name in sys.argv[1].split():
    importlib.import_module(name)
EOF
}

PY=""
for candidate in "${XAIOVERLAY_PYTHON:-}" "$ROOT/.venv-gpu/bin/python" "$ROOT/.venv/bin/python" python3; do
    [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 || continue
    if has_everything "$candidate"; then PY=$candidate; break; fi
done
if [ -z "$PY" ]; then
    command -v python3 >/dev/null 2>&1 || { echo "gpu_check: no python3 found; set XAIOVERLAY_PYTHON" >&2; exit 2; }
    echo "gpu_check: no Python with $NEEDED; making $ROOT/.venv-gpu on the system's packages (keeps its CUDA torch)"
    python3 -m venv --system-site-packages "$ROOT/.venv-gpu" \
        && "$ROOT/.venv-gpu/bin/python" -m pip install -q "torch>=2.1" "monai>=1.3" "SimpleITK>=2.3" pyyaml \
            "pytest>=8" "captum>=0.7" numpy nibabel matplotlib \
        || { echo "gpu_check: could not install the packages into .venv-gpu (no package index here?);" \
                  "set XAIOVERLAY_PYTHON to a Python that has $NEEDED" >&2; exit 2; }
    PY="$ROOT/.venv-gpu/bin/python"
fi

# No CUDA, no check: say why in one line and stop (a CPU build of torch is the usual reason).
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    version=$("$PY" -c 'import torch
print(torch.__version__, "CUDA build" if torch.version.cuda else "CPU-only build")' 2>/dev/null)
    echo "gpu_check: no CUDA GPU visible to PyTorch ($version, $PY); run this on a machine with an NVIDIA GPU," \
         "driver and a CUDA build of torch (pip install torch without constraints.txt)" >&2
    exit 2
fi
OUT=${GPU_CHECK_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/xaioverlay-gpu-check-XXXXXX")}
mkdir -p "$OUT" || { echo "gpu_check: cannot create $OUT; set GPU_CHECK_OUT to a writable folder" >&2; exit 2; }
"$PY" -c 'import torch; p = torch.cuda.get_device_properties(0)
print(f"gpu_check: {p.name}, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}", end=" ")
print(f"(CUDA {torch.version.cuda}); logs in", end=" ")'
echo "$OUT"

names=(); results=(); seconds=()
run_step() {  # $1 name, $2 budget in s, then the command; its output goes to the terminal and $OUT/<name>.log
    local name=$1 budget=$2; shift 2
    local left=$(( TOTAL_S - $(elapsed) ))
    [ "$budget" -gt "$left" ] && budget=$left
    names+=("$name")
    if [ "$budget" -lt 20 ]; then
        results+=("not run: no time left"); seconds+=(0); return
    fi
    echo; echo "=== $name (limit ${budget} s) ==="
    local t0; t0=$(date +%s)
    timeout --kill-after=10 "$budget" "$@" 2>&1 | tee "$OUT/$name.log"
    local code=${PIPESTATUS[0]}
    seconds+=($(( $(date +%s) - t0 )))
    case $code in
        0) results+=("passed") ;;
        124|137) results+=("TIMED OUT after ${budget} s") ;;
        *) results+=("FAILED (exit $code)") ;;
    esac
}

mapfile -t cuda_tests < <(grep -rl --include='test_*.py' -e 'mark\.cuda' Testing | sort)
if [ ${#cuda_tests[@]} -eq 0 ]; then
    names+=("cuda-tests"); results+=("FAILED: no test file carries the cuda marker"); seconds+=(0)
else
    run_step cuda-tests "$TESTS_S" "$PY" -m pytest -q -p no:cacheprovider -m cuda "${cuda_tests[@]}"
    skipped=$(grep -c '^SKIPPED' "$OUT/cuda-tests.log" 2>/dev/null)
    if [ "${results[-1]}" = "passed" ] && [ "${skipped:-0}" -gt 0 ]; then  # with a GPU nothing may be skipped
        results[-1]="FAILED: $skipped skipped (reasons below)"
    fi
fi
if [ -f tools/benchmark_ct_scale.py ]; then
    run_step benchmark-cuda "$BENCH_S" "$PY" tools/benchmark_ct_scale.py --device cuda "${bench_args[@]}" \
        --json "$OUT/benchmark-cuda.json"
    run_step benchmark-cuda-amp "$AMP_S" "$PY" tools/benchmark_ct_scale.py --device cuda --amp "${bench_args[@]}" \
        --json "$OUT/benchmark-cuda-amp.json"
else
    names+=("benchmark"); results+=("FAILED: tools/benchmark_ct_scale.py missing (issue 11, item 1)"); seconds+=(0)
fi

echo; echo "=== gpu_check summary ($(elapsed) s of ${TOTAL_S} s; logs in $OUT) ==="
status=0
for i in "${!names[@]}"; do
    printf '  %-20s %5s s  %s\n' "${names[$i]}" "${seconds[$i]}" "${results[$i]}"
    [ "${results[$i]}" = "passed" ] || status=1
done
grep -h -E '^(FAILED|ERROR|SKIPPED)' "$OUT/cuda-tests.log" 2>/dev/null | sed 's/^/  /'
exit $status
