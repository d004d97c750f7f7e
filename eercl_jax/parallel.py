"""Device mesh, shardings and host<->device transfer for data-parallel training.

One mesh over every device of every process, one named axis `data`. Batches are sharded on it,
parameters, optimiser state and banks are replicated. Each process feeds only its own rows of the
global batch (`jax.make_array_from_process_local_data`), so the same code runs on one CPU, one
GPU, or many hosts.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def create_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else list(devices)
  # Auto axes: XLA propagates shardings through the reshapes of grouped BN and view grouping
  # (current jax defaults to Explicit axes, which would need a sharding rule for each of them).
  return jax.make_mesh((len(devices),), (DATA_AXIS,), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of a global batch -> global arrays sharded on the data axis."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
  return jax.device_put(tree, replicated(mesh))


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """Starts JAX's distributed runtime when this is one process of several.

  Explicit arguments win; otherwise JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
  are read; otherwise a SLURM job step with more than one task is detected and JAX's own SLURM
  cluster detection fills everything in. A single plain process does nothing. Returns whether the
  runtime was started.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None and env.get("JAX_NUM_PROCESSES"):
    num_processes = int(env["JAX_NUM_PROCESSES"])
  if process_id is None and env.get("JAX_PROCESS_ID"):
    process_id = int(env["JAX_PROCESS_ID"])
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("a coordinator address needs the number of processes and this process's "
                       "id (JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
    if num_processes <= 1:
      return False
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True
  if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in env:
    jax.distributed.initialize()
    return True
  return False


def resolve_batch_sizes(config) -> None:
  """`config.per_device_batch_size > 0` makes the global batch per-device batch x devices;
  otherwise `config.batch_size` is the global batch whatever the device count (the default:
  the method's numbers are per global batch)."""
  if config.per_device_batch_size > 0:
    config.batch_size = config.per_device_batch_size * jax.device_count()
