#!/usr/bin/env bash
# Runs vlrep.train on every worker of a multi-host Cloud TPU VM slice, from your machine:
#
#   bash launch/tpu_pod.sh my-v5p-64 us-east5-a --project=my-proj -- \
#       --config=configs/coca.py:base --workdir=gs://my-bucket/runs/base --config.mesh.fsdp=8
#
# It runs `gcloud compute tpus tpu-vm ssh TPU_NAME --zone=ZONE --worker=all
# --command="cd REPO && python -m vlrep.train FLAGS"`, the flags quoted for the remote shell.
# Each worker needs the code at REPO (--repo, default vlrep: relative paths start from the
# home directory, where ssh sessions start) and vlrep installed (e.g.
# `gcloud ... --worker=all --command="git clone ... vlrep && pip install -e vlrep"`), the same
# version everywhere. jax finds its peers from the TPU metadata; nothing else to set.
#
# The workdir must be the same storage on every worker: checkpoints are written collectively
# (each worker writes its own shards), metrics by process 0. A worker-local path gives each
# worker a partial, unusable checkpoint. A gs:// URL (read and written through gcsfs, see the
# README's "Runs on buckets") or a mount every worker has (Filestore / NFS) does.
#
# The processes live as long as the ssh sessions: a dropped connection stops the run (resume
# by running the same command again: training restarts from the latest checkpoint). For long
# runs, run this script itself inside tmux / screen.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: bash launch/tpu_pod.sh TPU_NAME ZONE [--project=PROJECT] [--repo=DIR] [--python=PY] \
           -- <vlrep.train flags>
  --project=PROJECT  Google Cloud project (default: gcloud's configured one)
  --repo=DIR         repository checkout on each worker, relative to the home directory
                     or absolute (default: vlrep)
  --python=PY        interpreter on the workers (default: python3)
  --dry_run          print the gcloud command instead of running it
EOF
}

die() {
  usage >&2
  echo "error: $*" >&2
  exit 2
}

positional=()
project=''
repo='vlrep'
python='python3'
dry_run=''
while [[ $# -gt 0 ]]; do
  case $1 in
    --project=*) project=${1#*=} ;;
    --repo=*) repo=${1#*=} ;;
    --python=*) python=${1#*=} ;;
    --dry_run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option '$1' (vlrep.train flags go after --)" ;;
    *) positional+=("$1") ;;
  esac
  shift
done
[[ ${#positional[@]} -eq 2 ]] || die "give TPU_NAME and ZONE (got ${#positional[@]} arguments)"
[[ $# -gt 0 ]] || die "no vlrep.train flags after -- (at least --config and --workdir)"
tpu_name=${positional[0]}
zone=${positional[1]}

for flag in "$@"; do
  case $flag in
    --workdir=/tmp/* | --workdir=./* | --workdir=\~/* | --workdir=/home/*)
      echo "warning: ${flag#--workdir=} looks worker-local; every worker must write to the" \
        "same storage (see the comment at the top of $0)" >&2 ;;
  esac
done

# The remote shell re-parses the command: quote every word for it. A leading ~/ (which %q
# would protect from expansion) is dropped instead: ssh sessions start in the home directory.
remote="cd $(printf '%q' "${repo#\~/}") && $(printf '%q' "$python") -m vlrep.train"
for flag in "$@"; do
  remote+=" $(printf '%q' "$flag")"
done

cmd=(gcloud compute tpus tpu-vm ssh "$tpu_name" "--zone=$zone" --worker=all)
if [[ -n $project ]]; then
  cmd+=("--project=$project")
fi
cmd+=("--command=$remote")
if [[ -n $dry_run ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
