#!/usr/bin/env bash
# Issue 4's results table: Glyphs 5-way 1-shot and 5-shot test accuracy (600 test tasks,
# 95% CI) for ProtoNet, MAML (second order) and FineTune, plus the sinusoid 10-shot MSE of
# MAML vs Meta-SGD at 5, 10 and 20 shots. Each line is one `pymeta train` run; its last lines print the test
# result and the training time. About 1.5 hours on 2 CPU cores.
#   bash benchmarks/glyphs_results.sh [OUT_DIR]      (default: runs/results)
set -euo pipefail
out=${1:-runs/results}
mkdir -p "$out"
run() {  # name, then pymeta train arguments
    local name=$1; shift
    echo "== $name: pymeta train $*"
    pymeta train "$@" --no-progress --out "$out/$name.pt" | tail -3
}
run protonet-1shot --algo protonet
run protonet-5shot --algo protonet --shots 5
run maml-1shot     --algo maml --iterations 2000
run maml-5shot     --algo maml --shots 5 --iterations 2000
run finetune-1shot --algo finetune
run finetune-5shot --algo finetune --shots 5
for k in 5 10 20; do  # the Meta-SGD paper's shot counts
    run sinusoid-maml-$k    --algo maml --data sinusoid --shots "$k" --iterations 1500
    run sinusoid-metasgd-$k --algo metasgd --data sinusoid --shots "$k" --iterations 1500
done
