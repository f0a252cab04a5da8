#!/usr/bin/env bash
# Distributed hyper-parameter search on one host: a keras-tuner chief (the oracle, serving
# trials over gRPC) and N workers that each train one trial at a time.
#
#   scripts/tune_distributed.sh NUM_WORKERS --flagfile=configs/tune.flags [more flags]
#
# Every process gets the same flags; the flags' --model_dir (the sweep) must be a directory
# every process can read and write. The chief exits once every trial is done and writes
# summary.csv and best_trial.flags there. Rerunning the command resumes the sweep.
#
# Environment:
#   PYTHON                 interpreter (default: .venv/bin/python if present, else python3)
#   KERASTUNER_ORACLE_IP   address the chief listens on and workers dial (default 127.0.0.1)
#   KERASTUNER_ORACLE_PORT chief's port (default: a free port)
#   TUNE_GPUS_PER_WORKER   give worker i the GPUs [i*G, (i+1)*G) via CUDA_VISIBLE_DEVICES
#                          (default 0: workers inherit CUDA_VISIBLE_DEVICES unchanged)
#   TUNE_LOG_DIR           where chief.log and worker<i>.log go (default: a new /tmp dir)
#
# On a cluster, run the same command pieces by hand: on the chief host
#   KERASTUNER_TUNER_ID=chief KERASTUNER_ORACLE_IP=0.0.0.0 KERASTUNER_ORACLE_PORT=8000 \
#     python -m mri_keras.tune --flagfile=...
# and on each worker host (a unique id per worker)
#   KERASTUNER_TUNER_ID=tuner0 KERASTUNER_ORACLE_IP=<chief host> KERASTUNER_ORACLE_PORT=8000 \
#     python -m mri_keras.tune --flagfile=...
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ || "$1" -lt 1 ]]; then
  echo "usage: $0 NUM_WORKERS [mri_keras.tune flags, e.g. --flagfile=configs/tune.flags]" >&2
  exit 2
fi
num_workers=$1
shift

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
ip=${KERASTUNER_ORACLE_IP:-127.0.0.1}
port=${KERASTUNER_ORACLE_PORT:-$("$PYTHON" -c 'import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
gpus_per_worker=${TUNE_GPUS_PER_WORKER:-0}
log_dir=${TUNE_LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/mri_keras_tune.XXXXXX")}
mkdir -p "$log_dir"
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
export KERASTUNER_ORACLE_IP=$ip KERASTUNER_ORACLE_PORT=$port

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap 'cleanup; exit 130' INT TERM

echo "oracle at $ip:$port; $num_workers worker(s); logs in $log_dir"
# The chief only serves the oracle: it needs no GPU.
KERASTUNER_TUNER_ID=chief CUDA_VISIBLE_DEVICES="" \
  "$PYTHON" -m mri_keras.tune "$@" >"$log_dir/chief.log" 2>&1 &
chief_pid=$!
pids+=("$chief_pid")

for ((i = 0; i < num_workers; i++)); do
  (
    export KERASTUNER_TUNER_ID="tuner$i"
    if [[ "$gpus_per_worker" -gt 0 ]]; then
      export CUDA_VISIBLE_DEVICES=$(seq -s, $((i * gpus_per_worker)) $(((i + 1) * gpus_per_worker - 1)))
    fi
    exec "$PYTHON" -m mri_keras.tune "$@" >"$log_dir/worker$i.log" 2>&1
  ) &
  pids+=("$!")
done

status=0
for ((i = 0; i < num_workers; i++)); do
  if ! wait "${pids[$((i + 1))]}"; then
    echo "worker $i failed; see $log_dir/worker$i.log" >&2
    status=1
  fi
done
if [[ $status -ne 0 ]]; then
  # A dead worker may hold a trial the chief would wait for forever.
  kill "$chief_pid" 2>/dev/null || true
fi
if ! wait "$chief_pid"; then
  [[ $status -ne 0 ]] || echo "chief failed; see $log_dir/chief.log" >&2
  status=1
fi
cat "$log_dir/chief.log" | sed -n '/^Top trials/,$p'
exit $status
