#!/usr/bin/env bash
# The README's results table: Glyphs 5-way 1-shot and 5-shot test accuracy (600 test tasks,
# 95% CI) of every classification algorithm with `pymeta train`'s budget for it, MANN's and
# the plain LSTM's per-instance accuracy, and the sinusoid MSE of MAML vs Meta-SGD at 5, 10
# and 20 shots. Each run is one `pymeta train`; its last lines (the test result and the
# training time) go to OUT_DIR/NAME.txt, its checkpoint to OUT_DIR/NAME.pt.
#
#   bash benchmarks/glyphs_results.sh [OUT_DIR [NAME...]]   (default: runs/results, every run)
#
# Name runs to do a part of them (e.g. `bash benchmarks/glyphs_results.sh runs/results mann
# lstm`); an unknown name lists them all. MANN takes ~5 min on a quiet 2-core CPU; on a busy
# one MAML++ took 4 / 13 min (1 / 5 shots) and every other run a few minutes.
set -euo pipefail
out=${1:-runs/results}
shift || true
mkdir -p "$out"
declare -A RUNS=()
ORDER=()
for algo in protonet maml mamlpp finetune relationnet matchingnet; do
    RUNS[$algo-1shot]="--algo $algo"
    RUNS[$algo-5shot]="--algo $algo --shots 5"
    ORDER+=("$algo-1shot" "$algo-5shot")
done
RUNS[mann]="--algo mann"
RUNS[lstm]="--algo lstm"
ORDER+=(mann lstm)
for k in 5 10 20; do  # the Meta-SGD paper's shot counts
    RUNS[sinusoid-maml-$k]="--algo maml --data sinusoid --shots $k --iterations 1500"
    RUNS[sinusoid-metasgd-$k]="--algo metasgd --data sinusoid --shots $k --iterations 1500"
    ORDER+=("sinusoid-maml-$k" "sinusoid-metasgd-$k")
done
names=("$@")
[ ${#names[@]} -gt 0 ] || names=("${ORDER[@]}")
for name in "${names[@]}"; do
    [ -n "${RUNS[$name]:-}" ] || { echo "unknown run '$name'; runs: ${ORDER[*]}" >&2; exit 2; }
    echo "== $name: pymeta train ${RUNS[$name]}"
    # shellcheck disable=SC2086  # the options are words
    pymeta train ${RUNS[$name]} --no-progress --overwrite --out "$out/$name.pt" | tail -4 | tee "$out/$name.txt"
done
