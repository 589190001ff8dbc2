#!/usr/bin/env bash
# A real multi-process (multi-host style) run on this machine, for testing:
# NPROC CPU processes, each with LOCAL_DEVICES devices, talking over gloo.
#
#   launch/local.sh NPROC CONFIG WORKDIR [--config.key=value ...]
#   LOCAL_DEVICES=4 launch/local.sh 2 configs/sft.py:tiny /tmp/sft2
#
# Process 0 writes metrics and logs; every process reads its own data shard.
# LOCAL_XLA_FLAGS: XLA_FLAGS for the processes (default none; the device
# count is set through RLHF_JAX_LOCAL_DEVICES, not XLA_FLAGS).
# Exits non-zero if any process fails.
# The processes use no persistent compilation cache (JAX_COMPILATION_CACHE_DIR
# is dropped): with jax 0.12.1, a resumed 2-process CPU run whose executables
# came from the cache hung in its first collective (2026-12-06).
set -euo pipefail
unset JAX_COMPILATION_CACHE_DIR
if [[ $# -lt 3 ]]; then
  echo "usage: $0 NPROC CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
nproc=$1; config=$2; workdir=$3; shift 3
local_devices=${LOCAL_DEVICES:-4}
port=${PORT:-$((20000 + RANDOM % 20000))}
python=${PYTHON:-python3}
pids=()
for ((i = 0; i < nproc; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="${LOCAL_XLA_FLAGS:-}" \
  RLHF_JAX_COORDINATOR="localhost:${port}" RLHF_JAX_NUM_PROCESSES="$nproc" \
  RLHF_JAX_PROCESS_ID="$i" RLHF_JAX_LOCAL_DEVICES="$local_devices" \
    "$python" -m rlhf_jax.main --config "$config" --workdir "$workdir" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit $status
