#!/usr/bin/env bash
# The accelerator figures of the README's Performance section in one run, for a session that
# has a GPU or TPU for a few minutes: coca.py:small and coca.py:base in bf16 through
# vlrep.bench (step time, MFU, peak memory; base at the first batch size of BASE_BATCHES that
# fits), then the attention implementations at small's shapes (XLA's against cuDNN's fused
# kernel on GPU). Each command has its own time limit (LIMIT seconds) so that one hang does
# not cost the rest; each one's output goes to OUT_DIR/NAME.log and its last lines here.
# Run from the repository root:
#
#   bash benchmarks/accelerator_figures.sh [OUT_DIR]
set -u -o pipefail
out=${1:-.}
mkdir -p "$out"
export PYTHONUNBUFFERED=1  # a run killed by its limit still leaves its output

run() {
  local name=$1
  shift
  echo "== $name: $*"
  timeout "${LIMIT:-240}" "$@" > "$out/$name.log" 2>&1
  local status=$?
  tail -n 2 "$out/$name.log"
  return $status
}

python3 -c 'import jax; print(jax.__version__, jax.devices())'
run small_bf16 python3 -m vlrep.bench --config=configs/coca.py:small \
    --config.model.dtype=bfloat16 --steps=10
for batch in ${BASE_BATCHES:-256 128 64}; do
  # mesh.fsdp=1: the paper configs shard parameters 128 ways, for pods.
  run "base_bf16_batch$batch" python3 -m vlrep.bench --config=configs/coca.py:base \
      --config.batch_size="$batch" --config.mesh.fsdp=1 --steps=10 && break
done
run attention_small_bf16 python3 benchmarks/attention_speed.py --variant=small --batch=64 \
    --dtype=bfloat16 --rounds=5
