#!/usr/bin/env bash
# flowdiff's GPU check: one prepared run, under 5 minutes on one H200, for the day a GPU is lent.
#
#   bash benchmarks/gpu_check.sh [--cpu] [--quick] [--no-bench] [--prepare] [--help]
#
# On the GPU machine, from the repository's root, it
#   1. sets up: torch with CUDA, torchdiffeq, einops, pytest, hypothesis must be there already; diffusers (and
#      importlib_metadata) come from the wheels in .whl/ when not installed (`--prepare` downloads them, here);
#   2. prints the device (torch, CUDA, the GPU's name, nvidia-smi) and fails if CUDA is not available;
#   3. runs the CUDA variants of the device-parametrised tests (pytest --device cuda): DDIM against diffusers'
#      DDIMScheduler, the exact reversible round trips in float32/float64, the solvers' orders, guidance,
#      likelihood, compare, the closed-form models, the shipped model, and "no host sync per step" for fixed-grid
#      generates; it fails if any fails, or if DDIM equivalence or the round trips did not run;
#   4. runs benchmarks/bench_throughput.py on CUDA (images/s at fixed NFE against diffusers' loops, host syncs).
# Every step runs even if an earlier one failed (device time is scarce: one run says everything); the script
# then exits non-zero naming the failed steps. Outputs go to $OUT (the device tool's folder) if set, else to
# out/gpu_check: device.txt, pytest.log, pytest.xml, throughput.md, throughput.json, summary.txt.
#
# With the device tool: here, once, `bash benchmarks/gpu_check.sh --prepare` (fills the git-ignored .whl/);
# then run `bash benchmarks/gpu_check.sh` with carry [".whl"] and a timeout of about 420 s.
#
#   --cpu       check this script end to end on a CPU: the same steps with --device cpu, CUDA required nowhere
#   --quick     the smallest selection (two test files, the digits model at 2 NFE): with --cpu, for the tests
#   --no-bench  skip the throughput benchmark
#   --prepare   download the wheels that the GPU machine lacks into .whl/ and exit (needs PyPI: run it here)
# Environment: PYTHON (default python3), OUT, GPU_CHECK_TESTS (test paths, replacing the default list),
# GPU_CHECK_PYTEST_ARGS (more pytest arguments, e.g. -x).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PYTHON="${PYTHON:-python3}"
DEVICE=cuda
QUICK=0
BENCH=1
PREPARE=0
for arg in "$@"; do
    case "$arg" in
        --cpu) DEVICE=cpu ;;
        --quick) QUICK=1 ;;
        --no-bench) BENCH=0 ;;
        --prepare) PREPARE=1 ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $arg (accepted: --cpu --quick --no-bench --prepare --help)" >&2
           exit 2 ;;
    esac
done

# The test files with device-parametrised tests (tests/test_gpu_check.py checks that this list is complete).
DEFAULT_TESTS=(tests/test_ddim_equivalence.py tests/test_analytic.py tests/test_reversible.py tests/test_inversion.py
               tests/test_solvers.py tests/test_guidance.py tests/test_likelihood.py tests/test_pretrained.py
               tests/test_compare.py tests/test_syncs.py tests/test_adjoint.py tests/test_latent_state_maker.py)
QUICK_TESTS=(tests/test_ddim_equivalence.py tests/test_syncs.py)
# The wheels the GPU machine's image lacks (pure Python), pinned to the versions installed here.
WHEELS=(diffusers importlib_metadata)
WHL_DIR="$ROOT/.whl"

if [ "$PREPARE" = 1 ]; then
    specs=()
    for name in "${WHEELS[@]}"; do
        version="$("$PYTHON" -c "import importlib.metadata as m; print(m.version('$name'))")" || {
            echo "gpu_check.sh --prepare: $name is not installed for $PYTHON, so no version to pin" >&2; exit 2; }
        specs+=("$name==$version")
    done
    mkdir -p "$WHL_DIR"
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d "$WHL_DIR" "${specs[@]}" || exit 1
    echo "wheels for the GPU machine in $WHL_DIR: ${specs[*]} (carry [\".whl\"] with the run)"
    exit 0
fi

OUT_DIR="${OUT:-$ROOT/out/gpu_check}"
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
FAILED=()
note() { echo "$*" | tee -a "$SUMMARY"; }
step() { echo; echo "== $*"; }
fail() { FAILED+=("$1"); note "FAILED: $1${2:+ ($2)}"; }

# -- 1. set-up ---------------------------------------------------------------------------------
step "set-up ($PYTHON)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PYTHON" -c "import importlib.util as u, sys; sys.exit(u.find_spec('diffusers') is None)" 2>/dev/null; then
    if compgen -G "$WHL_DIR/*.whl" > /dev/null; then
        SITE="${TMPDIR:-/tmp}/flowdiff-gpu-check-site"
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "$WHL_DIR"/*.whl || { fail "set-up" "pip install of .whl/"; }
        export PYTHONPATH="$PYTHONPATH:$SITE"
        note "installed from .whl/ into $SITE: $(cd "$WHL_DIR" && ls -- *.whl | tr '\n' ' ')"
    fi
fi
missing="$("$PYTHON" - <<'EOF'
import importlib.util
names = ["torch", "torchdiffeq", "einops", "numpy", "scipy", "safetensors", "pytest", "hypothesis", "diffusers",
         "importlib_metadata", "sklearn", "flowdiff", "solvers"]
print(" ".join(name for name in names if importlib.util.find_spec(name) is None))
EOF
)" || missing="python failed to start: $PYTHON"
if [ -n "$missing" ]; then
    fail "set-up" "cannot import: $missing; for diffusers run \`bash benchmarks/gpu_check.sh --prepare\` here and carry .whl"
    note "gpu_check: stopping: nothing below can run without these"
    exit 1
fi

# -- 2. the device -------------------------------------------------------------------------------
step "device"
"$PYTHON" - "$DEVICE" > "$OUT_DIR/device.txt" 2>&1 <<'EOF'
import importlib.metadata, platform, sys
import torch
want = sys.argv[1]
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA build {torch.version.cuda}), "
      f"diffusers {importlib.metadata.version('diffusers')}")
print(f"torch.cuda.is_available(): {torch.cuda.is_available()}")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, "
              f"capability {p.major}.{p.minor}")
if want == "cuda" and not torch.cuda.is_available():
    sys.exit("CUDA is not available: this is not a GPU machine (or torch is a CPU build); "
             "use --cpu to check the script itself")
EOF
device_rc=$?
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv >> "$OUT_DIR/device.txt" 2>&1
fi
cat "$OUT_DIR/device.txt"
if [ "$device_rc" != 0 ]; then
    fail "device" "$(tail -n 1 "$OUT_DIR/device.txt")"
    note "gpu_check: stopping: no $DEVICE device"
    exit 1
fi

# -- 3. the device-parametrised tests ------------------------------------------------------------------
if [ -n "${GPU_CHECK_TESTS:-}" ]; then
    read -r -a TESTS <<< "$GPU_CHECK_TESTS"
elif [ "$QUICK" = 1 ]; then
    TESTS=("${QUICK_TESTS[@]}")
else
    TESTS=("${DEFAULT_TESTS[@]}")
fi
SELECT=(--device "$DEVICE")
[ "$DEVICE" = cpu ] && SELECT+=(-k cpu)  # the CPU variants of the device-parametrised tests only
step "tests on $DEVICE: ${TESTS[*]}"
start=$SECONDS
read -r -a EXTRA <<< "${GPU_CHECK_PYTEST_ARGS:-}"
"$PYTHON" -m pytest -q -p no:cacheprovider -ra "${SELECT[@]}" "${EXTRA[@]}" --junitxml "$OUT_DIR/pytest.xml" \
    "${TESTS[@]}" \
    2>&1 | tee "$OUT_DIR/pytest.log"
pytest_rc=${PIPESTATUS[0]}
note "tests on $DEVICE: exit $pytest_rc in $((SECONDS - start)) s: $(grep -E '[0-9]+ (passed|failed|error)' "$OUT_DIR/pytest.log" | tail -n 1)"
if [ "$pytest_rc" != 0 ]; then
    fail "tests" "pytest exit $pytest_rc: see pytest.log"
fi
# DDIM equivalence and the exact round trips must have run on the device, not been skipped or deselected.
"$PYTHON" - "$OUT_DIR/pytest.xml" "$DEVICE" "${TESTS[@]}" <<'EOF' | tee -a "$SUMMARY"
import sys
import xml.etree.ElementTree as ET
path, device, files = sys.argv[1], sys.argv[2], sys.argv[3:]
must = [f for f in ("test_ddim_equivalence", "test_reversible", "test_inversion") if any(f in p for p in files)]
passed = {}
for case in ET.parse(path).iter("testcase"):
    if "[" in case.get("name", "") and device in case.get("name") and not list(case):
        key = case.get("classname", "").split(".")[-1]
        passed[key] = passed.get(key, 0) + 1
for name in must:
    print(f"{name}: {passed.get(name, 0)} {device} variant(s) passed")
missing = [name for name in must if not passed.get(name)]
sys.exit(f"no {device} variant passed in {', '.join(missing)}" if missing else 0)
EOF
[ "${PIPESTATUS[0]}" != 0 ] && fail "coverage" "DDIM equivalence / round trips did not pass on $DEVICE"

# -- 4. throughput ---------------------------------------------------------------------------
if [ "$BENCH" = 1 ]; then
    step "throughput on $DEVICE"
    BENCH_ARGS=(--device "$DEVICE" --out "$OUT_DIR/throughput.md" --json "$OUT_DIR/throughput.json")
    [ "$QUICK" = 1 ] && BENCH_ARGS+=(--models digits --nfe 2 --repeats 1 --batch 4 --sync-steps 1,2)
    start=$SECONDS
    "$PYTHON" benchmarks/bench_throughput.py "${BENCH_ARGS[@]}"
    bench_rc=$?
    note "throughput on $DEVICE: exit $bench_rc in $((SECONDS - start)) s"
    [ "$bench_rc" != 0 ] && fail "throughput" "bench_throughput.py exit $bench_rc"
fi

echo
if [ "${#FAILED[@]}" != 0 ]; then
    note "gpu_check on $DEVICE: FAILED: ${FAILED[*]}"
    exit 1
fi
note "gpu_check on $DEVICE: all passed"
