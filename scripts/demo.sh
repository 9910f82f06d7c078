#!/usr/bin/env bash
# make demo: a real federation on this machine. One fedpool-server and N fedpool-client processes
# on loopback (QUIC, mutual TLS with a fresh CA), federated fine-tuning of MiniLM's SSF pool
# (FedIns) on VADER sentiment, each client holding two of the four domains (shard k/4 of each, so
# no sentence is on two clients). Prints the per-round table and where the checkpoint is.
#
# Knobs (environment): CLIENTS (8), ROUNDS (3), STEPS local steps per round (8), BATCH (16),
# EVAL_MAX held-out examples evaluated per client (100), CODEC (compressed: top-10% + int8 uploads
# with error feedback; or fp32), DOWNLOAD (fp32, or int8: the global pool quantized on the way
# down too, a quarter of the bytes but noisier starting points), ADAPTER (ssf-pool; lora: PEFT's
# standard form, rank 8 on q and v; adalora: the SVD form), BUDGET (none, or importance: AdaLoRA
# rank budgets under bandwidth — client i
# declares an upload of 1, 4, 16 or 64 kB/s, rounds have a 120 s deadline, and the server grants
# each client the triplets its link carries; its log lists the grants), DEMO_DIR (demo-run),
# BIN (target/release), STATUS_LISTEN (127.0.0.1:0: the coordinator's status page and metrics on
# a free loopback port, printed at the start), MODEL (minilm; smollm2: SmolLM2-135M-Instruct from its 4-bit GGUF, a causal
# LM that generates "positive"/"negative" after a ChatML prompt, judged by exact match; LoRA on
# q_proj/v_proj by default, with CPU-sized defaults: 2 clients, 2 rounds of 4 steps × 8, 20 held out).
# Scale up: CLIENTS=8 ROUNDS=20 STEPS=50 EVAL_MAX=1000, and device = "cuda:0" in the client configs
# on a GPU build (cargo build --release --features cuda -p fedpool-client).
set -euo pipefail

MODEL=${MODEL:-minilm}
ASSETS=${FEDPOOL_ASSETS:-$(pwd)/assets}
case "$MODEL" in
  minilm) MODEL_PATH="$ASSETS/minilm"; MAX_LEN=64
    CLIENTS=${CLIENTS:-8}; ROUNDS=${ROUNDS:-3}; STEPS=${STEPS:-8}; BATCH=${BATCH:-16}; EVAL_MAX=${EVAL_MAX:-100} ;;
  smollm2) MODEL_PATH="$ASSETS/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"; MAX_LEN=256; ADAPTER=${ADAPTER:-lora}
    CLIENTS=${CLIENTS:-2}; ROUNDS=${ROUNDS:-2}; STEPS=${STEPS:-4}; BATCH=${BATCH:-8}; EVAL_MAX=${EVAL_MAX:-20} ;;
  *) echo "MODEL must be minilm or smollm2, not $MODEL" >&2; exit 2 ;;
esac
CODEC=${CODEC:-compressed}
DEMO_DIR=${DEMO_DIR:-demo-run}
BIN=${BIN:-target/release}
STATUS_LISTEN=${STATUS_LISTEN:-127.0.0.1:0}
DOMAINS=(tweets movieReviewSnippets amazonReviewSnippets nytEditorialSnippets)

DOWNLOAD=${DOWNLOAD:-fp32}
ADAPTER=${ADAPTER:-ssf-pool}
BUDGET=${BUDGET:-none}
case "$ADAPTER" in
  ssf-pool) LR=0.005 ;;
  lora) LR=$([ "$MODEL" = smollm2 ] && echo 0.005 || echo 0.0005) ;;
  adalora) LR=0.002 ;;
  *) echo "ADAPTER must be ssf-pool, lora or adalora, not $ADAPTER" >&2; exit 2 ;;
esac
DEADLINE=30m
BUDGET_TOML=""
case "$BUDGET" in
  none) ;;
  importance)
    [ "$ADAPTER" = adalora ] || { echo "BUDGET=importance cuts AdaLoRA triplets: it needs ADAPTER=adalora" >&2; exit 2; }
    DEADLINE=120s
    BUDGET_TOML=$'[budget]\npolicy = "importance"\nsafety_margin = 0.8\nexpected_compute_s = 30' ;;
  *) echo "BUDGET must be none or importance, not $BUDGET" >&2; exit 2 ;;
esac
case "$CODEC" in
  compressed) UP=$'quantization = "int8"\ntop_k = 0.1' ;;
  fp32) UP='quantization = "fp32"' ;;
  *) echo "CODEC must be compressed or fp32, not $CODEC" >&2; exit 2 ;;
esac
case "$DOWNLOAD" in
  fp32|int8) DOWN="quantization = \"$DOWNLOAD\"" ;;
  *) echo "DOWNLOAD must be fp32 or int8, not $DOWNLOAD" >&2; exit 2 ;;
esac
[ -e "$MODEL_PATH" ] || { echo "no model at $MODEL_PATH: run scripts/fetch-assets.sh" >&2; exit 1; }

rm -rf "$DEMO_DIR"
mkdir -p "$DEMO_DIR/logs"
DEMO_DIR=$(cd "$DEMO_DIR" && pwd)
cd "$DEMO_DIR"

"$OLDPWD/$BIN/fedpool-server" certs init --dir certs >/dev/null
for i in $(seq 0 $((CLIENTS - 1))); do
  "$OLDPWD/$BIN/fedpool-server" certs issue --dir certs --name "client-$i" >/dev/null
done
"$OLDPWD/$BIN/fedpool-client" spec --model "$MODEL_PATH" --adapter "$ADAPTER" --num-labels 2 --out spec.json 2>/dev/null

cat > server.toml <<TOML
listen = "127.0.0.1:0"
state_dir = "state"
ca_cert = "certs/ca.pem"
server_cert = "certs/server.pem"
server_key = "certs/server.key"
backbone_dir = "$MODEL_PATH"
spec_file = "spec.json"
rounds = $ROUNDS
clients_per_round = $CLIENTS
quorum = $CLIENTS
deadline = "$DEADLINE"
eval_deadline = "30m"
local_steps = $STEPS
seed = 0
heartbeat = "10s"
idle_timeout = "120s"
metrics_listen = "$STATUS_LISTEN"

[download_codec]
$DOWN

$BUDGET_TOML
$( [ -n "$BUDGET_TOML" ] && printf '[budget.upload_codec]\n%s\n' "$UP" )
TOML

for i in $(seq 0 $((CLIENTS - 1))); do
  d1=${DOMAINS[$((i % 4))]}
  d2=${DOMAINS[$(((i + 1) % 4))]}
  # The four holders of a domain get the four different shards of it.
  shard=$((2 * ((i / 4) % 2) + i % 2))
  cat > "client-$i.toml" <<TOML
server_addr_file = "state/listen.addr"
ca_cert = "certs/ca.pem"
cert = "certs/clients/client-$i.pem"
key = "certs/clients/client-$i.key"
model = "$MODEL_PATH"
data = "vader:$d1,$d2"
shard = "$shard/4"
test_fraction = 0.2
eval_max_examples = $EVAL_MAX
state_dir = "client-$i"
device = "auto"
seed = $i
idle_timeout = "120s"
declared_upload_bps = $((1000 * 4 ** (i % 4)))

[adapter]
kind = "$ADAPTER"

[train]
batch_size = $BATCH
lr = $LR
max_len = $MAX_LEN

[upload_codec]
$UP
TOML
done

echo "fedpool demo: $MODEL, $CLIENTS clients × 2 VADER domains, $ADAPTER, $ROUNDS rounds of $STEPS steps × $BATCH, upload $CODEC, download $DOWNLOAD, budget $BUDGET, in $DEMO_DIR" >&2
START=$(date +%s)
"$OLDPWD/$BIN/fedpool-server" run --config server.toml 2> logs/server.log &
SERVER=$!
PIDS=()
cleanup() { kill "${PIDS[@]}" "$SERVER" 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 100); do [ -s state/listen.addr ] && [ -s state/metrics.addr ] && break; sleep 0.1; done
[ -s state/metrics.addr ] && echo "status page: http://$(cat state/metrics.addr)/ (Prometheus text at /metrics)" >&2
for i in $(seq 0 $((CLIENTS - 1))); do
  RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-1} "$OLDPWD/$BIN/fedpool-client" run --config "client-$i.toml" 2> "logs/client-$i.log" &
  PIDS+=($!)
done
# Progress: one line per committed round from the server's log.
tail -n +1 -f logs/server.log --pid "$SERVER" 2>/dev/null | grep --line-buffered -E "round [0-9]+ (committed|evaluated)" | sed -u 's/^.*\(round [0-9]\)/\1/' >&2 &
if ! wait "$SERVER"; then
  echo "the server failed; see $DEMO_DIR/logs/server.log" >&2
  tail -n 20 logs/server.log >&2
  exit 1
fi
wait "${PIDS[@]}" || true
trap - EXIT
echo >&2
"$OLDPWD/$BIN/fedpool-server" report --state state
LAST=$(ls state/round-*.safetensors | tail -n 1)
echo
echo "global adapter: $DEMO_DIR/$LAST ($(( $(date +%s) - START )) s)"
if [ "$MODEL" = smollm2 ]; then
  echo "as a PEFT adapter: $BIN/fedpool-client peft export --adapter $DEMO_DIR/$LAST --base-model $(basename "$MODEL_PATH") --out $DEMO_DIR/peft"
else
  echo "evaluate it anywhere: $BIN/fedpool-client eval --model $MODEL_PATH --adapter $DEMO_DIR/$LAST --data vader --limit 2000"
fi
