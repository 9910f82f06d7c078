#!/usr/bin/env bash
# Runs a study's arms over several seeds, one `fedpool-sim run` each, then the seed summary
# (`fedpool-sim seeds`: mean ± std per round, plots with bands) into OUT.
#   scripts/seed-study.sh compression   docs/compression/*.toml (upload codecs; ~5 min a run, 2 cores)
#   scripts/seed-study.sh budgets20     docs/budgets20/*.toml   (rank budgets, 20 rounds)
# Knobs: BIN, OUT (default docs/NAME), ARMS (names of docs/NAME/*.toml, in run order), SEEDS
# (default "0 1 2"), ORDER=seed (every arm of seed 0 first; default) or arm. A run whose
# summary.json exists is kept: an interrupted study resumes where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=${1:?usage: scripts/seed-study.sh NAME (a folder of experiment files in docs/)}
[ -d "docs/$NAME" ] || { echo "seed-study: no folder docs/$NAME" >&2; exit 2; }
BIN=${BIN:-target/release/fedpool-sim}
OUT=${OUT:-docs/$NAME}
SEEDS=${SEEDS:-0 1 2}
ORDER=${ORDER:-seed}
ARMS=${ARMS:-$(cd "docs/$NAME" && ls -- *.toml | sed 's/\.toml$//')}
if [ ! -x "$BIN" ]; then
  cargo build --release -p fedpool-sim
fi
run_one() { # arm seed
  local dir="$OUT/runs/$1/seed-$2"
  [ -f "$dir/summary.json" ] && return 0
  mkdir -p "$dir"
  # The arm's file with its seed replaced (every other setting as written).
  sed "s/^seed = .*/seed = $2/" "docs/$NAME/$1.toml" > "$dir/experiment.toml"
  "$BIN" run --config "$dir/experiment.toml" --out "$dir"
}
if [ "$ORDER" = arm ]; then
  for arm in $ARMS; do for seed in $SEEDS; do run_one "$arm" "$seed"; done; done
else
  for seed in $SEEDS; do for arm in $ARMS; do run_one "$arm" "$seed"; done; done
fi
# The seed summary, against REFERENCE (default: the first arm of ARMS), arms in ARMS order.
REFERENCE=${REFERENCE:-${ARMS%% *}}
runs=()
for arm in $ARMS; do for d in "$OUT/runs/$arm"/seed-*; do [ -f "$d/summary.json" ] && runs+=("$d"); done; done
"$BIN" seeds --reference "$REFERENCE" --out "$OUT" "${runs[@]}"
