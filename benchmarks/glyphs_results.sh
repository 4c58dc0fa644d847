#!/usr/bin/env bash
# The README's results table: Glyphs 5-way 1-shot and 5-shot test accuracy (600 test tasks,
# 95% CI) of every classification algorithm with `pymeta train`'s budget for it, MANN's and
# the plain LSTM's per-instance accuracy, and the sinusoid MSE of MAML vs Meta-SGD at 5, 10
# and 20 shots. Each run is one `pymeta train`; its last lines (the test result and the
# training time) go to OUT_DIR/NAME.txt, its checkpoint to OUT_DIR/NAME.pt.
#
#   bash benchmarks/glyphs_results.sh [OUT_DIR [NAME...]]   (default: runs/results, every run)
#
# Every run at once takes about 2 hours on 2 CPU cores; name runs to do a part of them
# (e.g. `bash benchmarks/glyphs_results.sh runs/results mann lstm`).
set -euo pipefail
out=${1:-runs/results}
shift || true
mkdir -p "$out"
declare -A RUNS=(
    [protonet-1shot]="--algo protonet"
    [protonet-5shot]="--algo protonet --shots 5"
    [maml-1shot]="--algo maml --iterations 2000"
    [maml-5shot]="--algo maml --shots 5 --iterations 2000"
    [mamlpp-1shot]="--algo mamlpp --iterations 2000"
    [mamlpp-5shot]="--algo mamlpp --shots 5 --iterations 2000"
    [finetune-1shot]="--algo finetune"
    [finetune-5shot]="--algo finetune --shots 5"
    [relationnet-1shot]="--algo relationnet"
    [relationnet-5shot]="--algo relationnet --shots 5"
    [matchingnet-1shot]="--algo matchingnet"
    [matchingnet-5shot]="--algo matchingnet --shots 5"
    [mann]="--algo mann"
    [lstm]="--algo lstm"
)
ORDER=(protonet-1shot protonet-5shot maml-1shot maml-5shot mamlpp-1shot mamlpp-5shot
       finetune-1shot finetune-5shot relationnet-1shot relationnet-5shot
       matchingnet-1shot matchingnet-5shot mann lstm)
for k in 5 10 20; do  # the Meta-SGD paper's shot counts
    RUNS[sinusoid-maml-$k]="--algo maml --data sinusoid --shots $k --iterations 1500"
    RUNS[sinusoid-metasgd-$k]="--algo metasgd --data sinusoid --shots $k --iterations 1500"
    ORDER+=(sinusoid-maml-$k sinusoid-metasgd-$k)
done
names=("$@")
[ ${#names[@]} -gt 0 ] || names=("${ORDER[@]}")
for name in "${names[@]}"; do
    [ -n "${RUNS[$name]:-}" ] || { echo "unknown run '$name'; runs: ${ORDER[*]}" >&2; exit 2; }
    echo "== $name: pymeta train ${RUNS[$name]}"
    # shellcheck disable=SC2086  # the options are words
    pymeta train ${RUNS[$name]} --no-progress --overwrite --out "$out/$name.pt" | tail -4 | tee "$out/$name.txt"
done
