#!/usr/bin/env bash
# The one command to run on a CUDA machine (no network needed):
#
#   bash scripts/gpu_check.sh
#
# 1. installs wheels found in .whl/ (offline), then the project in editable mode (builds _host);
# 2. prints nvidia-smi and the torch / triton versions;
# 3. runs the whole test suite (on CUDA the tests run the real kernels, bf16 included);
# 4. runs the benches and writes benches/results/<gpu-name>-<YYYY-MM-DD>.json and .md;
# 5. copies both result files to $OUT when $OUT is set.
#
# The benches run and the results are written even when the tests fail; the exit status is then
# the tests' (non-zero). GPU_CHECK_PYTEST_ARGS (e.g. "-x -k attention") is passed to both pytest
# runs. PYTHON overrides the interpreter (default python3).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"

read -r -a PYTEST_EXTRA <<< "${GPU_CHECK_PYTEST_ARGS:-}"

section() { printf '\n===== %s =====\n' "$*"; }

section "install"
shopt -s nullglob
wheels=(.whl/*.whl)
shopt -u nullglob
if (( ${#wheels[@]} > 0 )); then
    echo "installing ${#wheels[@]} wheel(s) from .whl/"
    "$PY" -m pip install --no-index --no-deps --no-build-isolation "${wheels[@]}"
fi
"$PY" -m pip install --no-index --no-build-isolation --no-deps -e .

section "device"
if command -v nvidia-smi > /dev/null 2>&1; then
    nvidia-smi || echo "nvidia-smi failed"
else
    echo "nvidia-smi not found"
fi
"$PY" - <<'EOF'
import torch
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        cap = torch.cuda.get_device_capability(i)
        print(f"  cuda:{i} {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
try:
    import triton
    print(f"triton {triton.__version__}")
except Exception as exc:  # report, the tests will say more
    print(f"triton not importable: {exc!r}")
EOF

section "tests"
tests_rc=0
"$PY" -m pytest -q tests ${PYTEST_EXTRA[@]+"${PYTEST_EXTRA[@]}"} || tests_rc=$?
echo "tests exit code: $tests_rc"

section "benches"
slug="$("$PY" - <<'EOF'
import re
import torch
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
print(re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown-device")
EOF
)"
stamp="$(date +%Y-%m-%d)"
mkdir -p benches/results
json="benches/results/${slug}-${stamp}.json"
md="benches/results/${slug}-${stamp}.md"
bench_rc=0
"$PY" -m pytest -q benches --benchmark-json="$json" ${PYTEST_EXTRA[@]+"${PYTEST_EXTRA[@]}"} || bench_rc=$?
echo "benches exit code: $bench_rc"

report_rc=0
if [[ -f "$json" ]]; then
    "$PY" scripts/bench_report.py "$json" > "$md" || report_rc=$?
    echo "wrote $json and $md"
    if [[ -n "${OUT:-}" ]]; then
        mkdir -p "$OUT"
        cp "$json" "$OUT/"
        if [[ -f "$md" ]]; then cp "$md" "$OUT/"; fi
        echo "copied results to $OUT"
    fi
else
    echo "no benchmark JSON was written (no bench ran?)"
fi

section "result"
echo "tests: exit $tests_rc; benches: exit $bench_rc; report: exit $report_rc"
if (( tests_rc != 0 )); then
    echo "FAILED: the test suite failed"
    exit "$tests_rc"
fi
if (( bench_rc != 0 )); then
    echo "FAILED: the benches failed"
    exit "$bench_rc"
fi
if (( report_rc != 0 )); then
    echo "FAILED: scripts/bench_report.py failed"
    exit "$report_rc"
fi
echo "OK"
