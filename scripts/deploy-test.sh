#!/usr/bin/env bash
# Tests of deploy/ on this machine (README, "Deploying"). One entry point:
#
#   scripts/deploy-test.sh local        deploy/slurm/task.sh under a local launcher: N (2) processes on
#                                       loopback with SLURM_PROCID / SLURM_NTASKS / SLURM_JOB_NODELIST
#                                       set by hand; checks OUT/rounds.csv has every round
#   scripts/deploy-test.sh slurm        configures and starts a single-node Slurm on this host
#                                       (idempotent; Debian's slurm-wlm and munge, installed if missing),
#                                       submits deploy/slurm/fedpool-sim.sbatch with 2 tasks on the CPU,
#                                       waits, checks OUT/rounds.csv has every round
#   scripts/deploy-test.sh slurm-up     only the Slurm bring-up (and an `srun hostname` smoke test)
#   scripts/deploy-test.sh k8s          validates deploy/k8s/*.yaml: YAML syntax (PyYAML), the
#                                       Kubernetes schemas (kubernetes-validate, PyPI), and
#                                       `kubectl apply --dry-run=client` where it can run without a cluster
#   scripts/deploy-test.sh k8s-podman   the manifest's pods emulated with podman (no cluster here):
#                                       its args, env, Secret items, user, read-only root, on a podman
#                                       network where the Service name resolves; after `containers`
#   scripts/deploy-test.sh containers   podman (Debian's, installed if missing): the Containerfiles
#                                       from a locally made base image (no registry pull), the server
#                                       image's --help, and the compose federation as a podman pod
#
# Knobs: BIN (target/release), OUT (target/deploy-test/MODE), TASKS (2), ROUNDS (2), CLIENTS (4),
# EXAMPLES (40, per client), DEVICE (slurm: task.sh's choice), FEDPOOL_ASSETS (./assets; `make
# assets` fetches them), TIMEOUT_S (900). The Slurm test cluster has 2 fake GPUs: TASKS <= 2.
set -euo pipefail

MODE=${1:-}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
BIN=${BIN:-$ROOT/target/release}
ASSETS=${FEDPOOL_ASSETS:-$ROOT/assets}
TASKS=${TASKS:-2}
ROUNDS=${ROUNDS:-2}
CLIENTS=${CLIENTS:-4}
EXAMPLES=${EXAMPLES:-40}
TIMEOUT_S=${TIMEOUT_S:-900}
VENV=${FEDPOOL_DEPLOY_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/fedpool-deploy-venv}

log() { echo "deploy-test: $*" >&2; }
die() { echo "deploy-test: $*" >&2; exit 1; }
elapsed() { echo "$(( $(date +%s) - $1 )) s"; }

need_sim_worker() {
  [ -x "$BIN/fedpool-sim" ] || die "no $BIN/fedpool-sim: cargo build --release -p fedpool-sim"
  "$BIN/fedpool-sim" worker --help >/dev/null 2>&1 \
    || die "$BIN/fedpool-sim has no 'worker' command yet (the distributed mode): rebuild it"
  [ -e "$ASSETS/minilm/model.safetensors" ] || die "no MiniLM at $ASSETS/minilm: make assets"
}

# A tiny experiment: the real MiniLM, CLIENTS clients of EXAMPLES VADER sentences, ROUNDS rounds.
write_experiment() { # DIR
  mkdir -p "$1"
  cat > "$1/experiment.toml" <<TOML
name = "deploy-test"
seed = 0
model = "$ASSETS/minilm"
data = "vader"
device = "cpu"
clients = $CLIENTS
max_examples_per_client = $EXAMPLES
test_fraction = 0.2
eval_max_examples = 8

[partition]
scheme = "iid"

[federation]
rounds = $ROUNDS
local_steps = 2
deadline_s = 600.0

[adapter]
kind = "ssf-pool"
pool_size = 4
top_k = 2

[train]
batch_size = 4
max_len = 32
TOML
}

# OUT/rounds.csv has a header and one line per round, 1..ROUNDS.
check_rounds() { # OUT
  local csv=$1/rounds.csv
  [ -s "$csv" ] || die "no $csv"
  local got
  got=$(tail -n +2 "$csv" | cut -d, -f1 | tr '\n' ' ')
  [ "$got" = "$(seq -s ' ' 1 "$ROUNDS") " ] || die "$csv has rounds '$got', expected 1..$ROUNDS"
  log "ok: $csv has rounds 1..$ROUNDS"
  cat "$csv" >&2
}

# --- local: task.sh under a hand-made launcher --------------------------------------------------
run_local() {
  need_sim_worker
  local out=${OUT:-$ROOT/target/deploy-test/local}
  rm -rf "$out"; mkdir -p "$out"
  write_experiment "$out"
  # A fixed port every task knows (the coordinator's --listen and the workers' --coordinator): a
  # free one unless FEDPOOL_PORT says.
  local port=${FEDPOOL_PORT:-$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
  local start; start=$(date +%s)
  local pids=()
  for k in $(seq 0 $((TASKS - 1))); do
    SLURM_PROCID=$k SLURM_NTASKS=$TASKS SLURM_JOB_NODELIST=localhost \
      FEDPOOL_EXPERIMENT=$out/experiment.toml FEDPOOL_OUT=$out FEDPOOL_SIM=$BIN/fedpool-sim \
      FEDPOOL_PORT=$port FEDPOOL_DEVICE=cpu FEDPOOL_ASSETS=$ASSETS RAYON_NUM_THREADS=1 \
      timeout "$TIMEOUT_S" bash deploy/slurm/task.sh > "$out/task-$k.out" 2>&1 &
    pids+=($!)
  done
  local rc=0
  for p in "${pids[@]}"; do wait "$p" || rc=$?; done
  if [ "$rc" != 0 ]; then
    for k in $(seq 0 $((TASKS - 1))); do log "task $k:"; tail -n 20 "$out/task-$k.out" >&2; done
    die "a task failed (exit $rc) after $(elapsed "$start")"
  fi
  log "local launcher: $TASKS tasks finished in $(elapsed "$start")"
  check_rounds "$out"
}

# --- slurm: a single-node cluster on this host --------------------------------------------------
SLURM_CONF=/etc/slurm/slurm.conf
slurm_up() {
  local start; start=$(date +%s)
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
    log "installing slurm-wlm and munge (Debian)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y slurm-wlm munge >/dev/null \
      || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y slurm-wlm munge >/dev/null; }
  fi
  local host cpus mem layout
  host=$(hostname -s)
  cpus=$(nproc)
  # The node's layout as slurmd sees it (Boards, SocketsPerBoard, CoresPerSocket, ThreadsPerCore).
  layout=$(slurmd -C | head -n 1 | grep -oE '(Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=[0-9]+' | tr '\n' ' ')
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
  # No systemd, no cgroups (this sandbox's are a v1/v2 hybrid Slurm cannot use): linuxproc
  # tracking, no task plugin, no accounting. Two fake GPUs (a Gres with a count and no device
  # file) so the batch script's --gpus-per-task=1 is satisfiable; the test runs on the CPU.
  local conf
  conf=$(cat <<CONF
# Written by scripts/deploy-test.sh slurm: a single-node test cluster.
ClusterName=fedpool-test
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
GresTypes=gpu
NodeName=$host CPUs=$cpus ${layout}RealMemory=$mem Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
)
  local changed=0
  if [ "$(cat "$SLURM_CONF" 2>/dev/null)" != "$conf" ]; then
    printf '%s\n' "$conf" > "$SLURM_CONF"; changed=1
  fi
  # slurmd counts a GPU only with a device file: two stand-ins (character devices like /dev/null).
  for i in 0 1; do [ -e /dev/fedpool-fakegpu$i ] || mknod /dev/fedpool-fakegpu$i c 1 3; done
  printf 'NodeName=%s Name=gpu File=/dev/fedpool-fakegpu[0-1]\n' "$host" > /etc/slurm/gres.conf.new
  if ! cmp -s /etc/slurm/gres.conf.new /etc/slurm/gres.conf; then mv /etc/slurm/gres.conf.new /etc/slurm/gres.conf; changed=1
  else rm -f /etc/slurm/gres.conf.new; fi
  # slurmd 22.05 loads a cgroup plugin even with proctrack/linuxproc and task/none ("disabled"
  # is not known before 23.02): the v1 one, mounting and constraining nothing.
  printf 'CgroupPlugin=cgroup/v1\nCgroupAutomount=no\nConstrainCores=no\nConstrainRAMSpace=no\nConstrainDevices=no\n' \
    > /etc/slurm/cgroup.conf.new
  if ! cmp -s /etc/slurm/cgroup.conf.new /etc/slurm/cgroup.conf; then mv /etc/slurm/cgroup.conf.new /etc/slurm/cgroup.conf; changed=1
  else rm -f /etc/slurm/cgroup.conf.new; fi

  chown munge:munge /run/munge
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    [ -s /etc/munge/munge.key ] || { /usr/sbin/mungekey --create 2>/dev/null || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key; }
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  fi
  if [ "$changed" = 1 ]; then
    log "slurm.conf changed: (re)starting slurmctld and slurmd"
    for p in /run/slurmd.pid /run/slurmctld.pid; do
      if [ -s "$p" ]; then kill "$(cat "$p")" 2>/dev/null || true; fi
    done
    sleep 2
  fi
  if ! scontrol ping 2>/dev/null | grep -q UP; then
    log "starting slurmctld"
    /usr/sbin/slurmctld || die "slurmctld did not start: $(tail -n 3 /var/log/slurm/slurmctld.log)"
    for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
  fi
  if ! pgrep -F /run/slurmd.pid >/dev/null 2>&1; then
    log "starting slurmd"
    /usr/sbin/slurmd || die "slurmd did not start: $(tail -n 3 /var/log/slurm/slurmd.log)"
  fi
  # A restarted controller restores the node's old state (down, or inval from an earlier
  # configuration): resume it once slurmd has registered.
  local st
  for _ in $(seq 150); do
    st=$(sinfo -h -N -o '%T' 2>/dev/null | head -n 1)
    case "$st" in
      idle*|mixed*|allocated*) break ;;
      down*|drain*|inval*) scontrol update NodeName="$host" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.2
  done
  sinfo >&2
  sinfo -h -N -o '%T' | grep -qE '^(idle|mixed|allocated)' \
    || die "the node is not up: see /var/log/slurm/slurmctld.log and slurmd.log"
  log "Slurm up in $(elapsed "$start")"
  local t; t=$(date +%s)
  log "smoke test: srun -N1 -n2 hostname -> $(timeout 60 srun -N1 -n2 hostname | tr '\n' ' ')($(elapsed "$t"))"
}

run_slurm() {
  slurm_up
  need_sim_worker
  local out=${OUT:-$ROOT/target/deploy-test/slurm}
  rm -rf "$out"; mkdir -p "$out"
  write_experiment "$out"
  local start; start=$(date +%s)
  # The batch script as it is, with this machine's sizes on the command line: TASKS tasks on one
  # node, 1 CPU each, one (fake) GPU per task as in a real run. DEVICE=cpu|cuda:0 forces a device.
  local job
  # FEDPOOL_DEVICE unset: task.sh picks (Slurm sets CUDA_VISIBLE_DEVICES to a fake GPU here, and
  # with no working nvidia-smi the worker falls back to the CPU, as on a GPU-less node).
  job=$(env FEDPOOL_EXPERIMENT="$out/experiment.toml" FEDPOOL_OUT="$out" FEDPOOL_SIM="$BIN/fedpool-sim" \
        ${DEVICE:+"FEDPOOL_DEVICE=$DEVICE"} FEDPOOL_ASSETS="$ASSETS" \
        sbatch --parsable --nodes=1 --ntasks-per-node="$TASKS" --cpus-per-task=1 --mem-per-cpu=2G \
          --time=00:20:00 --output="$out/slurm-%j.out" deploy/slurm/fedpool-sim.sbatch)
  log "submitted job $job"
  local state=""
  for _ in $(seq "$TIMEOUT_S"); do
    state=$(squeue -h -j "$job" -o '%T' 2>/dev/null || true)
    [ -z "$state" ] && break
    sleep 1
  done
  [ -z "$state" ] || { scancel "$job"; die "job $job still $state after $TIMEOUT_S s: cancelled"; }
  local result
  result=$(scontrol show job -o "$job" 2>/dev/null | grep -oE '(JobState|ExitCode|RunTime)=[^ ]+' | tr '\n' ' ' || true)
  log "job $job finished in $(elapsed "$start"): ${result:-(no longer known to slurmctld)}"
  log "its output ($out/slurm-$job.out):"
  cat "$out/slurm-$job.out" >&2
  check_rounds "$out"
}

# --- k8s: validate the manifests ----------------------------------------------------------------
run_k8s() {
  local files=(deploy/k8s/*.yaml)
  python3 - "${files[@]}" <<'PY'
import sys, yaml
for f in sys.argv[1:]:
    docs = [d for d in yaml.safe_load_all(open(f)) if d is not None]
    print(f"{f}: YAML ok, {len(docs)} documents: " + ", ".join(f"{d['kind']}/{d['metadata']['name']}" for d in docs))
PY
  if [ ! -x "$VENV/bin/kubernetes-validate" ]; then
    log "installing kubernetes-validate (PyPI) into $VENV"
    python3 -m venv "$VENV" && "$VENV/bin/pip" install -q kubernetes-validate==1.37.0
  fi
  for v in 1.29.0 1.37.0; do
    "$VENV/bin/kubernetes-validate" --strict -k "$v" "${files[@]}"
  done
  if command -v kubectl >/dev/null; then
    # Client-side dry run: kubectl still asks a server for the API's resource list, so without a
    # cluster this fails at discovery; --validate=false and a dummy server show how far it gets.
    if kubectl apply --dry-run=client -o name -f deploy/k8s/ 2>/tmp/deploy-test-kubectl.err; then
      log "kubectl apply --dry-run=client: ok"
    else
      log "kubectl apply --dry-run=client (no cluster here): $(tail -n 1 /tmp/deploy-test-kubectl.err)"
    fi
  fi
}

case "$MODE" in
  local) run_local ;;
  slurm) run_slurm ;;
  slurm-up) slurm_up ;;
  k8s) run_k8s ;;
  k8s-podman) exec bash "$ROOT/deploy/k8s/podman-test.sh" ;;
  containers) exec bash "$ROOT/deploy/containers/podman-test.sh" ;;
  *) sed -n '2,20p' "$0" >&2; exit 2 ;;
esac
