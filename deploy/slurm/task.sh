#!/usr/bin/env bash
# One task of a distributed fedpool-sim run (README, "Deploying"). `srun` starts one of these per
# GPU (deploy/slurm/fedpool-sim.sbatch); scripts/deploy-test.sh local starts N of them by hand on
# loopback with the same variables set, as a local launcher.
#
# Every task runs one worker, `fedpool-sim worker --name worker-$SLURM_PROCID`; task 0 also runs the
# coordinator, `fedpool-sim run --workers $SLURM_NTASKS`, in the background, and exits with its
# status. The coordinator is the first host of $SLURM_JOB_NODELIST (Slurm's block distribution puts
# task 0 there).
#
# From Slurm (or set by hand):
#   SLURM_PROCID        this task's rank, 0 .. SLURM_NTASKS-1
#   SLURM_NTASKS        the number of tasks = workers
#   SLURM_JOB_NODELIST  the job's hosts (compressed, e.g. gpu[01-04]); the first one is the coordinator
#   SLURM_CPUS_PER_TASK the CPU threads a worker may use (RAYON_NUM_THREADS); default: all
#   CUDA_VISIBLE_DEVICES  set by Slurm to the task's GPU (--gpus-per-task=1), so it is cuda:0
# The run (environment):
#   FEDPOOL_EXPERIMENT  the experiment file (required; on the shared filesystem: every worker resolves
#                       its model and data paths against this file's folder, as the coordinator does)
#   FEDPOOL_OUT         the run's output folder (required; shared: the certificates live under it)
#   FEDPOOL_CERTS       the certificate folder (default FEDPOOL_OUT/certs). If it holds no CA the
#                       coordinator makes one at start and the workers wait for their files.
#   FEDPOOL_SIM         the fedpool-sim binary (default: fedpool-sim on PATH, else
#                       $SLURM_SUBMIT_DIR/target/release/fedpool-sim)
#   FEDPOOL_PORT        the coordinator's UDP port (default 7600)
#   FEDPOOL_COORDINATOR_HOST  override the coordinator's host name (default: the first host of the
#                       node list, through `scontrol show hostnames` where there is scontrol)
#   FEDPOOL_DEVICE      cpu | cuda:N | auto (default: cuda:0 when this task has a GPU, else cpu)
#   FEDPOOL_WAIT_S      how long a worker waits for its certificate and the coordinator (default 300)
#   FEDPOOL_RUN_ARGS    more arguments for `fedpool-sim run` (e.g. "--rounds 2"), word-split
set -euo pipefail

die() { echo "task.sh: $*" >&2; exit 2; }
: "${SLURM_PROCID:?task.sh: SLURM_PROCID is not set (run it under srun, or set it by hand)}"
: "${SLURM_NTASKS:?task.sh: SLURM_NTASKS is not set}"
: "${FEDPOOL_EXPERIMENT:?task.sh: FEDPOOL_EXPERIMENT (the experiment file) is not set}"
: "${FEDPOOL_OUT:?task.sh: FEDPOOL_OUT (the output folder) is not set}"
RANK=$SLURM_PROCID
NTASKS=$SLURM_NTASKS
OUT=$FEDPOOL_OUT
CERTS=${FEDPOOL_CERTS:-$OUT/certs}
PORT=${FEDPOOL_PORT:-7600}
WAIT_S=${FEDPOOL_WAIT_S:-300}
[ -f "$FEDPOOL_EXPERIMENT" ] || die "no experiment file $FEDPOOL_EXPERIMENT"

if [ -n "${FEDPOOL_SIM:-}" ]; then SIM=$FEDPOOL_SIM
elif command -v fedpool-sim >/dev/null 2>&1; then SIM=$(command -v fedpool-sim)
elif [ -n "${SLURM_SUBMIT_DIR:-}" ] && [ -x "$SLURM_SUBMIT_DIR/target/release/fedpool-sim" ]; then
  SIM=$SLURM_SUBMIT_DIR/target/release/fedpool-sim
else die "no fedpool-sim binary: set FEDPOOL_SIM or put it on PATH"; fi

# The coordinator's host: the first of the job's nodes.
if [ -n "${FEDPOOL_COORDINATOR_HOST:-}" ]; then COORD=$FEDPOOL_COORDINATOR_HOST
else
  : "${SLURM_JOB_NODELIST:?task.sh: SLURM_JOB_NODELIST is not set (or set FEDPOOL_COORDINATOR_HOST)}"
  if command -v scontrol >/dev/null 2>&1 && COORD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n 1) && [ -n "$COORD" ]; then :
  else
    # No scontrol (a local launcher): the first name of a plain list or of a range (gpu[01-04]).
    COORD=${SLURM_JOB_NODELIST%%[[,]*}
    REST=${SLURM_JOB_NODELIST:${#COORD}}
    if [ "${REST:0:1}" = "[" ]; then REST=${REST:1}; COORD=$COORD${REST%%[],-]*}; fi
  fi
fi

# The device: the GPU Slurm gave this task (CUDA_VISIBLE_DEVICES holds only it, so it is cuda:0).
if [ -n "${FEDPOOL_DEVICE:-}" ]; then DEVICE=$FEDPOOL_DEVICE
elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ "${CUDA_VISIBLE_DEVICES}" != "NoDevFiles" ] \
     && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then DEVICE=cuda:0
else DEVICE=cpu; fi
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-$SLURM_CPUS_PER_TASK}; fi

NAME=worker-$RANK
mkdir -p "$OUT/logs"
echo "task.sh: $NAME of $NTASKS on $(hostname), coordinator $COORD:$PORT, device $DEVICE, $SIM" >&2

worker() {
  "$SIM" worker --coordinator "$COORD:$PORT" --certs "$CERTS" --name "$NAME" \
    --device "$DEVICE" --server-name "$COORD" --wait-s "$WAIT_S"
}

if [ "$RANK" != 0 ]; then
  exec > >(tee "$OUT/logs/$NAME.log") 2>&1
  worker
  exit
fi

# Task 0: the coordinator in the background (its log in OUT/logs/coordinator.log), then a worker.
# shellcheck disable=SC2086  # FEDPOOL_RUN_ARGS is word-split on purpose
"$SIM" run --config "$FEDPOOL_EXPERIMENT" --out "$OUT" --workers "$NTASKS" \
  --listen "0.0.0.0:$PORT" --certs "$CERTS" --san "$COORD" ${FEDPOOL_RUN_ARGS:-} \
  > "$OUT/logs/coordinator.log" 2>&1 &
COORD_PID=$!
worker > >(tee "$OUT/logs/$NAME.log") 2>&1 &
WORKER_PID=$!
trap 'kill "$COORD_PID" "$WORKER_PID" 2>/dev/null || true' TERM INT

# Whichever ends first: a failed coordinator stops the worker (it would wait in vain); a failed
# worker stops nothing here (the coordinator decides whether the run can go on without it).
set +e
wait -n "$COORD_PID" "$WORKER_PID"
FIRST=$?
if ! kill -0 "$COORD_PID" 2>/dev/null; then
  COORD_RC=$FIRST
  if [ "$COORD_RC" != 0 ]; then kill "$WORKER_PID" 2>/dev/null; fi
  wait "$WORKER_PID"; WORKER_RC=$?
else
  WORKER_RC=$FIRST
  wait "$COORD_PID"; COORD_RC=$?
fi
set -e
echo "task.sh: coordinator exited $COORD_RC, $NAME exited $WORKER_RC; last lines of $OUT/logs/coordinator.log:" >&2
tail -n 15 "$OUT/logs/coordinator.log" >&2 || true
[ "$COORD_RC" = 0 ] || exit "$COORD_RC"
exit "$WORKER_RC"
