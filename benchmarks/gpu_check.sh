#!/usr/bin/env bash
# GPU readiness check: everything pymeta has to prove on a GPU, in one run of < 8 minutes.
#
#   usage: bash benchmarks/gpu_check.sh OUT_DIR             (on a machine with a CUDA device)
#          bash benchmarks/gpu_check.sh --dry-run [OUT_DIR] (anywhere: imports and the step list)
#          pymeta bench gpu [--dry-run] OUT_DIR            (the same, with pymeta's Python)
#
# Steps, each under its own time budget enforced with `timeout` (the budgets add up to
# less than 8 minutes, kill grace included):
#   build      `pymeta build-ext`: the C++ and CUDA extensions, once, before anything uses them
#              (fails unless the cuda backend is then available)
#   env        versions, `pymeta info` (which op backends run, or why not), nvidia-smi
#   tests      `pytest -m gpu`: every fused op with the triton and the cuda backend forced
#              against the float64 reference, gradcheck/gradgradcheck on the GPU, MAML and
#              Meta-SGD meta-gradients on the GPU, the CUDA-graph capture tests
#   bench-ops  `pymeta bench ops --device cuda`: the fused ops' achieved GB/s against the
#              device's memory bandwidth
#   meta-a/b/c/d  `bench_meta.py --device cuda` on workload group a, b, c, d: pymeta eager,
#              pymeta + torch.compile, pymeta + CUDA graphs, learn2learn, torch.func (easyfsl
#              for c); tasks/s, kernel launches per meta-step, memory, meta-gradient checks
# Each step writes its log (and tables/CSVs) to OUT_DIR; OUT_DIR/summary.md lists every
# step's status, time and budget and repeats the tables. It degrades instead of stopping:
# a missing peer library is reported as skipped by bench_meta.py, a failing or timed-out
# step is reported and the next step still runs (after a failed build without building
# again: PYMETA_NO_BUILD=1); the exit status is 1 if any step failed.
#
# Python: $PYTHON (default python3), e.g. PYTHON=/work/venv-peers/bin/python for the peers
# (benchmarks/setup_peers.sh). Triton runs compiled (TRITON_INTERPRET=0).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
DRY=0
OUT=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $arg" >&2; exit 2 ;;
        *) OUT="$arg" ;;
    esac
done
if [[ -z "$OUT" && $DRY == 0 ]]; then
    echo "usage: bash benchmarks/gpu_check.sh OUT_DIR   (or --dry-run [OUT_DIR])" >&2
    exit 2
fi
if ((DRY)); then
    OUT="${OUT:-OUT_DIR}"  # nothing is written
else
    mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" || exit 2
fi
export TRITON_INTERPRET=0

GRACE=5      # seconds `timeout` waits after its TERM before it KILLs
LIMIT=480    # the whole run: 8 minutes
META=("$PY" benchmarks/bench_meta.py --device cuda --repeats 3 --min-run-time 0.05)
META_LIBS=(pymeta "pymeta[compile=1]" "pymeta[cuda_graph=1]" learn2learn torch.func)
# name | budget (s) | command (bash; runs in the repository root)
STEPS=(
    "build|120|$PY -m pymeta build-ext --verbose && $PY -c \"import sys, pymeta.ops; s = pymeta.ops.backends()['cuda']; print('cuda backend:', s); sys.exit(s != 'available')\""
    "env|15|$PY -m pymeta info && { nvidia-smi || echo 'nvidia-smi: not available'; }"
    "tests|90|$PY -m pytest -n 0 -v --tb=short -m gpu tests/ --junitxml=$OUT/tests.xml"
    "bench-ops|75|$PY -m pymeta bench ops --device cuda --repeats 1 --out-dir $OUT/ops"
    "meta-a|40|${META[*]} --workloads a --libraries ${META_LIBS[*]@Q} --out-dir $OUT/meta-a"
    "meta-b|45|${META[*]} --workloads b --libraries ${META_LIBS[*]@Q} --out-dir $OUT/meta-b"
    "meta-c|20|${META[*]} --workloads c --libraries pymeta 'pymeta[compile=1]' 'pymeta[cuda_graph=1]' easyfsl --out-dir $OUT/meta-c"
    "meta-d|35|${META[*]} --workloads d --libraries ${META_LIBS[*]@Q} --out-dir $OUT/meta-d"
)

total=0
for step in "${STEPS[@]}"; do
    IFS='|' read -r _ budget _ <<<"$step"
    total=$((total + budget + GRACE))
done
if ((total > LIMIT)); then
    echo "gpu_check.sh: the budgets add up to $total s > $LIMIT s" >&2
    exit 2
fi

cd "$REPO" || exit 2
echo "pymeta GPU check: ${#STEPS[@]} steps, budgets (with ${GRACE} s kill grace each) at most $total s; output in $OUT"
for step in "${STEPS[@]}"; do
    IFS='|' read -r name budget cmd <<<"$step"
    printf '  %-10s %4d s  %s\n' "$name" "$budget" "$cmd"
done

if ((DRY)); then
    echo "== dry run: checking that everything the steps run imports (no GPU needed)"
    "$PY" - <<'EOF' || exit 1
import contextlib, io, runpy, sys
sys.path.insert(0, "benchmarks")
import torch, pymeta, pymeta.cli  # noqa: F401
failed = False
for script in ("bench_inner_sgd.py", "bench_proto.py", "bench_max_pool2d.py", "bench_meta.py"):
    sys.argv = [script, "--help"]
    try:  # --help: the script imports everything it uses, then argparse exits
        with contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(f"benchmarks/{script}", run_name="__main__")
    except SystemExit as exc:
        ok = exc.code in (0, None)
    except Exception as exc:
        ok = False
        print(f"  {script}: {type(exc).__name__}: {exc}")
    print(f"  {script}: {'imports' if ok else 'FAILS'}")
    failed |= not ok
for lib in ("triton", "learn2learn", "higher", "easyfsl"):
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            __import__(lib)
        print(f"  {lib}: imports")
    except Exception as exc:
        print(f"  {lib}: not importable here ({type(exc).__name__}); its steps or rows would be skipped")
print(f"  CUDA device visible to torch: {torch.cuda.is_available()}")
sys.exit(failed)
EOF
    collected="$("$PY" -m pytest -n 0 -q --collect-only -m gpu tests/ 2>&1 | tail -1)"
    echo "  pytest -m gpu collects: $collected"
    [[ "$collected" =~ ^[0-9]+/[0-9]+\ tests\ collected ]] || { echo "dry run: collecting the gpu tests failed"; exit 1; }
    echo "dry run ok: on a GPU, 'bash benchmarks/gpu_check.sh OUT_DIR' runs the steps above"
    exit 0
fi

if ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check.sh: no CUDA device visible to torch ($PY); on CPU use --dry-run" >&2
    exit 2
fi

SUMMARY="$OUT/summary.md"
failures=0
{
    echo "# pymeta GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "git $(git rev-parse --short HEAD 2>/dev/null || echo '?'), python $PY, output $OUT"
    echo
    echo "| step | status | seconds | budget | log |"
    echo "| --- | --- | --- | --- | --- |"
} >"$SUMMARY"
TABLES="$(mktemp)"
trap 'rm -f "$TABLES"' EXIT
for step in "${STEPS[@]}"; do
    IFS='|' read -r name budget cmd <<<"$step"
    log="$OUT/$name.log"
    echo "== $name (budget $budget s): $cmd"
    start=$SECONDS
    timeout --kill-after="$GRACE" "$budget" bash -c "$cmd" >"$log" 2>&1
    rc=$?
    took=$((SECONDS - start))
    case $rc in
        0) status="ok" ;;
        124|137) status="TIMED OUT (budget $budget s)"; failures=$((failures + 1)) ;;
        *) status="FAILED (exit $rc)"; failures=$((failures + 1)) ;;
    esac
    if [[ $name == build && $rc != 0 ]]; then
        # Later steps would otherwise try the same build again inside their own budgets.
        export PYMETA_NO_BUILD=1
        status="$status; later steps run with PYMETA_NO_BUILD=1 (backends needing the build are skipped)"
    fi
    echo "   $status in $took s; log: $log"
    echo "| $name | $status | $took | $budget | $name.log |" >>"$SUMMARY"
    {
        echo
        echo "## $name: $status"
        echo
        echo '```'
        case $name in
            # pytest's skip reasons and final counts; the benchmarks' closing tables.
            tests) grep -E '^(SKIPPED|FAILED|ERROR)' "$log" | tail -60; tail -1 "$log" ;;
            meta-*) sed -n '/^targets (measured vs goal):/,$p' "$log" | grep . || tail -40 "$log" ;;
            *) tail -60 "$log" ;;
        esac
        echo '```'
    } >>"$TABLES"
done
cat "$TABLES" >>"$SUMMARY"
echo "summary: $SUMMARY ($failures step(s) failed or timed out)"
((failures == 0))
