#!/usr/bin/env bash
# The rank-budget study of the README: fixed max rank, fixed min rank, HetLoRA (zero-pad),
# FlexLoRA and importance budgets on VADER (8 clients x 2 domains) over constrained uplinks
# (lognormal, median 5 kB/s, p90/p10 = 10) with a fixed 60 s deadline, the same rounds for each.
# Writes docs/budgets/: comparison.md, plots, one folder per arm. ~40 min on 2 CPU cores.
# Knobs: BIN, OUT, ARMS (names of docs/budgets/*.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/fedpool-sim}
OUT=${OUT:-docs/budgets}
ARMS=${ARMS:-"fixed-max fixed-min hetlora flexlora importance"}
if [ ! -x "$BIN" ]; then
  cargo build --release -p fedpool-sim
fi
configs=()
for arm in $ARMS; do configs+=("docs/budgets/$arm.toml"); done
"$BIN" run --compare "${configs[@]}" --out "$OUT"
