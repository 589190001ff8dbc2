"""Multi-host start-up through `jax.distributed` (TPU pods, SLURM, or flags).

On TPU pods and under SLURM `jax.distributed.initialize()` finds the
coordinator itself. Elsewhere (e.g. `launch/local.sh`), the environment gives
it: RLHF_JAX_COORDINATOR (host:port), RLHF_JAX_NUM_PROCESSES, RLHF_JAX_PROCESS_ID.
A single process with none of these set starts nothing.
"""
import os

import jax


def initialize():
    env = os.environ
    if env.get("RLHF_JAX_COORDINATOR"):
        jax.distributed.initialize(
            coordinator_address=env["RLHF_JAX_COORDINATOR"],
            num_processes=int(env["RLHF_JAX_NUM_PROCESSES"]),
            process_id=int(env["RLHF_JAX_PROCESS_ID"]),
            local_device_ids=None)
    elif env.get("SLURM_NTASKS", "1") != "1" or env.get("TPU_WORKER_HOSTNAMES") or \
            env.get("RLHF_JAX_AUTO_DISTRIBUTED") == "1":
        jax.distributed.initialize()
