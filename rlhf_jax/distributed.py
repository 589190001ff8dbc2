"""Multi-host start-up through `jax.distributed` (TPU pods, SLURM, or env).

- TPU pods and SLURM jobs: `jax.distributed.initialize()` finds the
  coordinator, process count and id itself (launch/tpu_pod.sh,
  launch/slurm_gpu.sh set RLHF_JAX_AUTO_DISTRIBUTED=1).
- Anywhere else (launch/local.sh, or your own launcher): set
  RLHF_JAX_COORDINATOR=host:port, RLHF_JAX_NUM_PROCESSES, RLHF_JAX_PROCESS_ID,
  and for CPU processes RLHF_JAX_LOCAL_DEVICES (devices per process); CPU
  processes then talk through gloo collectives.
- A single process with none of these set starts nothing.
"""
import os

import jax


def initialize():
    env = os.environ
    if env.get("RLHF_JAX_COORDINATOR"):
        if env.get("JAX_PLATFORMS", "") == "cpu" or env.get("RLHF_JAX_LOCAL_DEVICES"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            if env.get("RLHF_JAX_LOCAL_DEVICES"):
                jax.config.update("jax_num_cpu_devices", int(env["RLHF_JAX_LOCAL_DEVICES"]))
        jax.distributed.initialize(
            coordinator_address=env["RLHF_JAX_COORDINATOR"],
            num_processes=int(env["RLHF_JAX_NUM_PROCESSES"]),
            process_id=int(env["RLHF_JAX_PROCESS_ID"]))
    elif env.get("RLHF_JAX_AUTO_DISTRIBUTED") == "1":
        jax.distributed.initialize()


def gather(x):
    """A global (possibly multi-host sharded) array as one host numpy array on every process."""
    import numpy as np
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def host_sum(local) -> float:
    """Sum of a host value (a number or numpy array) over all processes."""
    import numpy as np
    local = np.asarray(local, np.float64)
    if jax.process_count() == 1:
        return float(local.sum())
    from jax.experimental import multihost_utils
    return float(np.asarray(multihost_utils.process_allgather(local)).sum())
