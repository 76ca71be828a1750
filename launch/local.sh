#!/usr/bin/env bash
# Runs N processes of `python -m vlrep.train` on this host, joined over loopback, each with M
# simulated CPU devices: the multi-host code paths (process-local batches, cross-process
# collectives, collective checkpoints) on one machine.
#
#   bash launch/local.sh --processes=2 --devices_per_process=2 -- \
#       --config=configs/coca.py:tiny --workdir=/tmp/run2
#
# Each process gets JAX_PLATFORMS=cpu, XLA_FLAGS+=--xla_force_host_platform_device_count=M,
# VLREP_COORDINATOR=127.0.0.1:PORT, VLREP_NUM_PROCESSES=N and VLREP_PROCESS_ID=i, and its
# output (stdout and stderr) prefixed with "[pI] ". Exits 0 only if every process does; when
# one fails, the others get --grace_s seconds (10) to fail by themselves before they are
# killed, and the script exits with the first failure's status (of processes found dead
# together, one killed by a signal counts first). SIGINT (Ctrl-C), SIGTERM and SIGHUP are
# forwarded to every process, then the same grace applies (jax takes a SIGTERM as a
# preemption notice and keeps running). PYTHON picks the interpreter (default: python).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: bash launch/local.sh --processes=N --devices_per_process=M [--port=P] [--grace_s=S] \
           -- <vlrep.train flags>
  --processes=N            number of processes (>= 1)
  --devices_per_process=M  simulated CPU devices in each process (>= 1)
  --port=P                 coordinator port on 127.0.0.1 (default: a free one)
  --grace_s=S              seconds the others get after a failure or signal before they
                           are killed (default: 10)
  PYTHON=...               interpreter to run (default: python)
EOF
}

die() {
  usage >&2
  echo "error: $*" >&2
  exit 2
}

is_count() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

processes=''
devices=''
port=''
grace=10
while [[ $# -gt 0 ]]; do
  case $1 in
    --processes=*) processes=${1#*=} ;;
    --devices_per_process=*) devices=${1#*=} ;;
    --port=*) port=${1#*=} ;;
    --grace_s=*) grace=${1#*=} ;;
    --) shift; break ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (vlrep.train flags go after --)" ;;
  esac
  shift
done
is_count "$processes" || die "--processes=N is required, N >= 1 (got '$processes')"
is_count "$devices" || die "--devices_per_process=M is required, M >= 1 (got '$devices')"
[[ $grace =~ ^[0-9]+$ ]] || die "--grace_s must be a whole number of seconds (got '$grace')"
python=${PYTHON:-python}
if [[ -z $port ]]; then
  # Free now; a race with another program taking it is possible but unlikely.
  port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
if ! is_count "$port" || ((port > 65535)); then
  die "--port must be in 1..65535 (got '$port')"
fi

fifos=$(mktemp -d)
pids=()
prefixers=()

# shellcheck disable=SC2329  # invoked by the EXIT trap
cleanup() {
  local pid
  # ${a[@]+...}: bash < 4.4 calls an empty array unbound under set -u.
  for pid in ${pids[@]+"${pids[@]}"} ${prefixers[@]+"${prefixers[@]}"}; do
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
  rm -rf "$fifos"
}
trap cleanup EXIT

# Process $1 of the run; the rest are vlrep.train flags. exec: its pid is the background job's.
run_process() {
  local id=$1
  shift
  JAX_PLATFORMS=cpu \
    XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices" \
    VLREP_COORDINATOR="127.0.0.1:$port" \
    VLREP_NUM_PROCESSES="$processes" \
    VLREP_PROCESS_ID="$id" \
    PYTHONUNBUFFERED=1 \
    exec "$python" -m vlrep.train "$@"
}

# Line by line as lines arrive (mawk's awk, for one, reads a pipe in blocks).
prefix() {
  local line
  while IFS= read -r line || [[ -n $line ]]; do
    printf '%s%s\n' "$1" "$line"
  done
}

status=0     # the exit status to report: the first failure's, or 128 + signal
deadline=''  # set once a process failed or a signal came: when to kill what is left
# shellcheck disable=SC2329  # invoked by the signal traps
signal_received() {
  echo "[local.sh] SIG$1: forwarding to all processes" >&2
  local pid
  for pid in ${pids[@]+"${pids[@]}"}; do
    kill "-$1" -- "-$pid" 2>/dev/null || true
  done
  if ((status == 0)); then
    status=$2
  fi
  if [[ -z $deadline ]]; then
    deadline=$((SECONDS + grace))
  fi
}
trap 'signal_received INT 130' INT
trap 'signal_received TERM 143' TERM
trap 'signal_received HUP 129' HUP

# Job control, while starting them, puts each child in its own process group (id = its pid):
# signals go to the group, so they reach whatever the process started too, and (unlike the
# default for a script's background jobs) SIGINT is not ignored there, so a forwarded Ctrl-C
# arrives. It is off again afterwards so that the terminal's Ctrl-C reaches this script.
set -m
for ((i = 0; i < processes; i++)); do
  mkfifo "$fifos/p$i"
  prefix "[p$i] " <"$fifos/p$i" &
  prefixers+=($!)
  run_process "$i" "$@" <"/dev/null" >"$fifos/p$i" 2>&1 &
  pids+=($!)
done
set +m
echo "[local.sh] $processes processes x $devices CPU devices, coordinator 127.0.0.1:$port," \
  "pids ${pids[*]}" >&2


# Poll rather than `wait -n`: bash 3.2 (macOS) lacks it, and a trapped signal interrupts
# `wait` anyway. bash reaps children as they exit and keeps their status for `wait PID`.
running=$processes
declare -a done_ rcs
while ((running > 0)); do
  exited=()
  for ((i = 0; i < processes; i++)); do
    if [[ -n ${done_[i]:-} ]] || kill -0 "${pids[i]}" 2>/dev/null; then
      continue
    fi
    rc=0
    wait "${pids[i]}" || rc=$?
    done_[i]=1
    running=$((running - 1))
    rcs[i]=$rc
    exited+=("$i")
  done
  # Processes seen dead in the same poll are reported signal deaths first: one killed from
  # outside takes its peers' collectives down with it within milliseconds, and its status,
  # not theirs, is the cause to report.
  signalled=()
  failed=()
  for i in ${exited[@]+"${exited[@]}"}; do
    if ((rcs[i] > 128)); then
      signalled+=("$i")
    elif ((rcs[i] != 0)); then
      failed+=("$i")
    fi
  done
  for i in ${signalled[@]+"${signalled[@]}"} ${failed[@]+"${failed[@]}"}; do
    echo "[local.sh] process $i exited with status ${rcs[i]}" >&2
    if ((status == 0)); then
      status=${rcs[i]}
    fi
    if [[ -z $deadline ]]; then
      deadline=$((SECONDS + grace))
    fi
  done
  if [[ -n $deadline ]] && ((running > 0 && SECONDS >= deadline)); then
    echo "[local.sh] killing the $running processes still running after ${grace}s" >&2
    for ((i = 0; i < processes; i++)); do
      if [[ -z ${done_[i]:-} ]]; then
        kill -KILL -- "-${pids[i]}" 2>/dev/null || true
      fi
    done
    deadline=$((SECONDS + 3600))  # killed: only reaping is left
  fi
  if ((running > 0)); then
    sleep 0.2 || true  # a Ctrl-C also interrupts the sleep
  fi
done
for pid in "${prefixers[@]}"; do
  wait "$pid" || true
done
pids=()
prefixers=()  # all reaped: nothing left for cleanup to kill
exit "$status"
