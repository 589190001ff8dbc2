#!/usr/bin/env bash
# Run a stage on every worker of a Cloud TPU VM slice (a TPU pod).
#
#   launch/tpu_pod.sh [--dry-run] --name NAME --zone ZONE --type v5litepod-32 \
#       [--version tpu-ubuntu2204-base] [--project P] [--repo URL | --copy] \
#       CONFIG WORKDIR [--config.key=value ...]
#
# Creates the slice if it does not exist (reuses it otherwise), brings the
# code to every worker (git clone/pull of --repo, or scp of this checkout with
# --copy), installs the package with jax[tpu], and runs the same command on
# all workers; jax.distributed.initialize() finds the pod itself. WORKDIR
# should be shared storage (a gs:// bucket or a mounted filesystem) so that
# Orbax checkpoints and the data cache are visible to every worker.
# --dry-run prints the commands instead of running them.
set -euo pipefail
dry=0; name=""; zone=""; type=""; version="tpu-ubuntu2204-base"; project=""; repo=""; copy=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) dry=1; shift ;;
    --name) name=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --type) type=$2; shift 2 ;;
    --version) version=$2; shift 2 ;;
    --project) project=$2; shift 2 ;;
    --repo) repo=$2; shift 2 ;;
    --copy) copy=1; shift ;;
    --) shift; break ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [[ -z $name || -z $zone || -z $type || $# -lt 2 ]]; then
  echo "usage: $0 [--dry-run] --name NAME --zone ZONE --type TYPE [--repo URL|--copy] CONFIG WORKDIR [overrides]" >&2
  exit 2
fi
config=$1; workdir=$2; shift 2
proj=${project:+--project=$project}
q() { printf '%q ' "$@"; }
run() { if [[ $dry == 1 ]]; then echo "$*"; else eval "$*"; fi; }

tpu="gcloud compute tpus tpu-vm"
if [[ $dry == 1 ]]; then
  echo "# create the slice unless it exists"
  echo "$tpu describe $name --zone=$zone $proj >/dev/null 2>&1 || $tpu create $name --zone=$zone --accelerator-type=$type --version=$version $proj"
elif ! $tpu describe "$name" --zone="$zone" $proj >/dev/null 2>&1; then
  $tpu create "$name" --zone="$zone" --accelerator-type="$type" --version="$version" $proj
fi
if [[ $copy == 1 ]]; then
  src=$(cd "$(dirname "$0")/.." && pwd)
  run "$tpu scp --recurse $(q "$src") $name:~/rlhf_jax --worker=all --zone=$zone $proj"
  fetch="true"
elif [[ -n $repo ]]; then
  fetch="if [ -d ~/rlhf_jax/.git ]; then git -C ~/rlhf_jax pull --ff-only; else git clone $(q "$repo") ~/rlhf_jax; fi"
else
  echo "give --repo URL or --copy" >&2; exit 2
fi
# jax 0.12 needs Python 3.12 or newer, which TPU VM images may not have: uv
# fetches one into a virtualenv that every later command runs in.
venv="~/.venv-rlhf_jax"
install="cd ~/rlhf_jax && python3 -m pip install -q uv && python3 -m uv venv -q --allow-existing --python 3.12 $venv && . $venv/bin/activate && python3 -m uv pip install -q -e . 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
cmd="RLHF_JAX_AUTO_DISTRIBUTED=1 python3 -m rlhf_jax.main --config $(q "$config")--workdir $(q "$workdir")$(q "$@")"
run "$tpu ssh $name --zone=$zone $proj --worker=all --command=$(q "$fetch && $install && cd ~/rlhf_jax && $cmd")"
