#!/usr/bin/env bash
# The strength of the reproduction's attacks on one trained model, from the command line: the
# multi-step corruption with 10 and 50 steps and 50 steps x 5 restarts, and the step-size-free
# ensemble, at the same eps (layer-relative L2), searched on the task's attack data and reported
# on its test split. One JSON per attack in OUT.
#   bash scripts/attack_strength.sh TASK CHECKPOINT OUT EPS...
# e.g. bash scripts/attack_strength.sh translation results/cache/translation/plain_lr0.001/seed0/train.pt \
#        results/strength/translation 0.002 0.005 0.01
set -euo pipefail
[ $# -ge 4 ] || { echo "usage: $0 TASK CHECKPOINT OUT EPS..." >&2; exit 2; }
task=$1 checkpoint=$2 out=$3
shift 3
cli=${PARASHIELD:-parashield}
mkdir -p "$out"
common=(--task "$task" --checkpoint "$checkpoint" --eps "$@" --threads "${THREADS:-1}")
classification=()
case $task in digits|fashion|bbc) classification=(--classification) ;; esac
"$cli" attack "${common[@]}" --steps 10 --json "$out/steps10.json"
"$cli" attack "${common[@]}" --steps 50 --json "$out/steps50.json"
"$cli" attack "${common[@]}" --steps 50 --restarts 5 --json "$out/steps50x5.json"
"$cli" evaluate "${common[@]}" "${classification[@]}" --json "$out/ensemble.json"
