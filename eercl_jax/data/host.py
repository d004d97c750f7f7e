"""How much of the host the input pipeline uses: the grain worker count and the prefetch depth,
resolved from the host's cores when the config leaves them unset (`None`).

  workers  = min(cores - 1, 16)   one core stays with the training loop; above ~16 worker
                                  processes a host's memory bandwidth, not its cores, limits
                                  JPEG decoding
  prefetch = 2                    batches in flight per worker (grain's threads and buffer)
             min(cores, 8)        with no workers (in-process), as decoding threads

`cores` are the CPUs this process may run on (its affinity mask: a SLURM task or a container
sees its own share, not the whole node). An explicit config value always wins; 0 workers keeps
decoding in the training process. docs/toolchain.md#host-input-path-throughput says why the
host is usually the limit.
"""
from __future__ import annotations

import os

MAX_WORKERS = 16


def available_cores() -> int:
  """CPUs this process may run on."""
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:   # not on Linux
    return max(1, os.cpu_count() or 1)


def default_num_workers(cores: int | None = None) -> int:
  cores = available_cores() if cores is None else cores
  return max(0, min(cores - 1, MAX_WORKERS))


def default_prefetch(num_workers: int, cores: int | None = None) -> int:
  cores = available_cores() if cores is None else cores
  return 2 if num_workers > 0 else max(2, min(cores, 8))


def resolve(num_workers: int | None, prefetch: int | None,
            cores: int | None = None) -> tuple[int, int]:
  """(workers, prefetch) with `None` replaced by the defaults for `cores` (default: this
  process's)."""
  workers = default_num_workers(cores) if num_workers is None else int(num_workers)
  depth = default_prefetch(workers, cores) if prefetch is None else int(prefetch)
  if workers < 0:
    raise ValueError(f"num_workers={workers} must be >= 0 (None: follow the host's cores)")
  if depth < 1:
    raise ValueError(f"prefetch={depth} must be >= 1 (None: follow the host's cores)")
  return workers, depth


def from_config(data_config) -> tuple[int, int]:
  """(workers, prefetch) of a `config.data`."""
  return resolve(data_config.num_workers, data_config.prefetch)
