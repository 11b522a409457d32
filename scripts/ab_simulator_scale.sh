#!/usr/bin/env bash
# ab_simulator_scale.sh BEFORE [PAIRS] [NUM]: the simulator's scale run
# (scripts/bench_simulator_scale.py --workers 1 --num-prompts NUM, default 30000) in this
# checkout and in BEFORE (another checkout of the repo with its own .venv, e.g.
# `git worktree add ../before 7f282f8`) at the same time, one per core, the cores swapped
# each pair (the two cores of a VM may run the same code at different speeds). Prints both
# CPU times (as the script reports them) and their ratio, new / before, per pair.
set -euo pipefail
BEFORE=$(cd "$1" && pwd); PAIRS=${2:-4}; N=${3:-30000}
HERE=$(cd "$(dirname "$0")/.." && pwd)
ARGS="--workers 1 --num-prompts $N --no-progress"
out=$(mktemp -d)
cpu() { grep -o "CPU seconds (all workers): [0-9.]*" "$1" | awk '{print $5}'; }
for i in $(seq "$PAIRS"); do
  if [ $((i % 2)) = 1 ]; then a=0; b=1; else a=1; b=0; fi
  (cd "$HERE" && taskset -c $a .venv/bin/python scripts/bench_simulator_scale.py $ARGS > "$out/new.txt" 2>&1) &
  (cd "$BEFORE" && taskset -c $b .venv/bin/python scripts/bench_simulator_scale.py $ARGS > "$out/before.txt" 2>&1) &
  wait
  n=$(cpu "$out/new.txt"); o=$(cpu "$out/before.txt")
  echo "pair $i: new (core $a) $n s, before (core $b) $o s, new/before $(python3 -c "print(round($n / $o, 3))")"
  grep -h "simulated" "$out/new.txt" "$out/before.txt"
done
rm -rf "$out"
