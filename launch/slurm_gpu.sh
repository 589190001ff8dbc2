#!/usr/bin/env bash
# Run a stage on a multi-node GPU cluster under SLURM: one process per node
# driving all of its GPUs; jax.distributed.initialize() reads SLURM's
# environment for the coordinator, process count and id.
#
#   launch/slurm_gpu.sh [--dry-run] [--partition P] [--time 04:00:00] \
#       NODES GPUS_PER_NODE CONFIG WORKDIR [--config.key=value ...]
#
# Needs the package installed (with jax[cuda12]) on every node and WORKDIR on
# a shared filesystem. --dry-run prints the srun command instead of running it.
set -euo pipefail
dry=0; partition=""; time_limit=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) dry=1; shift ;;
    --partition) partition=$2; shift 2 ;;
    --time) time_limit=$2; shift 2 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [[ $# -lt 4 ]]; then
  echo "usage: $0 [--dry-run] [--partition P] [--time T] NODES GPUS_PER_NODE CONFIG WORKDIR [overrides]" >&2
  exit 2
fi
nodes=$1; gpus=$2; config=$3; workdir=$4; shift 4
args=(srun --nodes="$nodes" --ntasks-per-node=1 --gpus-per-node="$gpus" --cpus-per-task=16)
[[ -n $partition ]] && args+=(--partition="$partition")
[[ -n $time_limit ]] && args+=(--time="$time_limit")
args+=(--export=ALL,RLHF_JAX_AUTO_DISTRIBUTED=1 python3 -m rlhf_jax.main --config "$config" --workdir "$workdir" "$@")
if [[ $dry == 1 ]]; then
  printf '%q ' "${args[@]}"; echo
else
  exec "${args[@]}"
fi
