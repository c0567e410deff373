"""One data-parallel code path for 1 CPU, 8 GPUs or many hosts: a ('data',) mesh.

Batches are sharded over `data`, everything else is replicated. Under `jax.jit`, XLA then
inserts the gradient all-reduce, and batch-norm statistics are computed over the global batch,
so they are identical on every device.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           auto: bool = False) -> None:
    """Joins a multi-host run: explicitly (address, count, id) or auto-detected on a cluster.

    Auto-detection covers SLURM, Open MPI, Kubernetes and TPU pods. Must run before any
    other JAX call; with nothing given and auto off it does nothing (single host).
    """
    if coordinator_address is not None or num_processes is not None or process_id is not None:
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    elif auto:
        jax.distributed.initialize()


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh over all devices of all hosts (or the first `num_devices`)."""
    devices = jax.devices()
    if num_devices is not None:
        if num_devices > len(devices):
            raise ValueError(f"asked for {num_devices} devices, only {len(devices)} exist")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def global_batch(local: dict, mesh: Mesh) -> dict:
    """This process's numpy batch -> one global jax.Array per key, sharded over `data`."""
    sharding = batch_sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
