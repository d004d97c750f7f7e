"""grain input pipelines: an infinite shuffled training stream and single-pass evaluation batches.

Both are built the same way: a grain `MapDataset` over *positions* in this process's share of the
stream, mapped to (epoch, list index) by a pure function, then to decoded and augmented examples,
then batched. Position -> example is pure in (seed, epoch, index), so batches do not depend on the
number of decoding workers or threads, and a stream resumes exactly from its iterator state.

grain's own `shuffle` is not used because it permutes a flat stream, which cannot drop each epoch's
incomplete last batch (the original's drop_last) nor give every process a contiguous block of rows
of the global batch.

Batches are dicts of numpy arrays; images are uint8 NHWC (normalised on device by the step).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import multiprocessing
import multiprocessing.connection
import multiprocessing.util
import os
import signal
import sys
import threading
from typing import Iterator, Sequence

import grain
import numpy as np

from eercl_jax.data import host, images, packed, transforms
from eercl_jax.data.lists import FerList
from eercl_jax.errors import DataError

VIEWS = ("weak", "strong", "test")
# Leading words of the seed-sequence entropy, so the permutation and the per-example streams can
# never share a seed (numpy zero-pads short entropy, so [s, e] and [s, e, 0] would collide).
_PERMUTATION_TAG = 0x5045524D
_VIEW_TAG = 0x56494557


@dataclasses.dataclass(frozen=True)
class ViewConfig:
  resize: int = 256   # square resize of the weak/test views
  crop: int = 224     # output size of every view


def view_config(data_config) -> ViewConfig:
  return ViewConfig(resize=data_config.resize, crop=data_config.crop)


@dataclasses.dataclass(frozen=True)
class Normalization:
  """uint8 NHWC -> float32, (x - mean) / std on the 0..255 scale as the original. Called on the
  device inside the jitted steps, so the host ships uint8 (4x less to transfer). Hashable: a jit
  may take it as a static argument."""
  mean: tuple[float, ...]
  std: tuple[float, ...]

  @classmethod
  def from_config(cls, data_config) -> "Normalization":
    return cls(tuple(float(v) for v in data_config.mean),
               tuple(float(v) for v in data_config.std))

  def __call__(self, images):
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    mean = jnp.asarray(self.mean, jnp.float32)
    std = jnp.asarray(self.std, jnp.float32)
    return (images.astype(jnp.float32) - mean) / std


# ----------------------------------------------------------------------- small pure helpers


def process_rows(global_batch: int, process_index: int, process_count: int) -> tuple[int, int]:
  """(first row, number of rows) of the global batch that process `process_index` produces."""
  if global_batch % process_count:
    raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} outside [0, {process_count})")
  rows = global_batch // process_count
  return process_index * rows, rows


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
  """Full global batches per epoch (the incomplete last one is dropped)."""
  return num_examples // global_batch


def epoch_of_step(step: int, *, num_examples: int, global_batch: int, start_epoch: int = 0) -> int:
  """Epoch of the `step`-th (0-based) batch of a `train_dataset` stream started at `start_epoch`."""
  return start_epoch + step // steps_per_epoch(num_examples, global_batch)


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The order of the list in `epoch`; cached because every example of the epoch asks for it."""
  perm = np.random.default_rng([_PERMUTATION_TAG, seed, epoch]).permutation(num_examples)
  perm.flags.writeable = False
  return perm


def view_rngs(seed: int, epoch: int, index: int, count: int) -> list[np.random.Generator]:
  """`count` independent generators for the augmentations of image `index` in `epoch`."""
  children = np.random.SeedSequence([_VIEW_TAG, seed, epoch, index]).spawn(count)
  return [np.random.default_rng(c) for c in children]


def view_keys(views: Sequence[str]) -> tuple[str, ...]:
  """Batch keys of the views: ('weak',) -> ('image',); ('weak','strong','strong') ->
  ('weak', 'strong1', 'strong2'): repeated views are numbered."""
  if len(views) == 1:
    return ("image",)
  totals, seen, keys = collections.Counter(views), collections.Counter(), []
  for v in views:
    seen[v] += 1
    keys.append(v if totals[v] == 1 else f"{v}{seen[v]}")
  return tuple(keys)


def make_view(view: str, img: np.ndarray, rng: np.random.Generator, cfg: ViewConfig) -> np.ndarray:
  if view == "weak":
    return transforms.weak_view(img, rng, cfg.resize, cfg.crop)
  if view == "strong":
    return transforms.strong_view(img, rng, cfg.crop)
  if view == "test":
    return transforms.test_view(img, cfg.resize, cfg.crop)
  raise ValueError(f"unknown view {view!r}; expected one of {VIEWS}")


# ---------------------------------------------------------------- position -> example maps
# Plain dataclasses with __call__ so grain can pickle them into worker processes.


@dataclasses.dataclass(frozen=True)
class _Example:
  """(epoch, list index, valid) -> dict of views, label, index (and valid when asked)."""
  fer_list: FerList
  views: tuple[str, ...]
  view_cfg: ViewConfig
  seed: int
  with_valid: bool
  images: object = None   # pixels by list index (e.g. a resident array); None: the list's own

  def __call__(self, located: tuple[int, int, bool]) -> dict:
    epoch, index, valid = located
    try:
      if self.images is not None:
        img = self.images[index]
      elif self.fer_list.packed_dir:
        img = packed.read_image(self.fer_list.packed_dir, index)
      else:
        img = images.load_image(self.fer_list.paths[index])
    except DataError as e:
      # Passed the start-up check but fails now (changed on disk, or the check was off): name
      # the list and line, which the image path alone does not give.
      raise DataError(
          f"{self.fer_list.list_path}:{int(self.fer_list.lines[index])}: {e}") from e
    rngs = view_rngs(self.seed, epoch, index, len(self.views))
    example = {key: make_view(view, img, rng, self.view_cfg)
               for key, view, rng in zip(view_keys(self.views), self.views, rngs)}
    example["label"] = np.int32(self.fer_list.labels[index])
    example["index"] = np.int32(index)
    if self.with_valid:
      example["valid"] = np.bool_(valid)
    return example


@dataclasses.dataclass(frozen=True)
class _TrainLocator:
  """k-th example of this process's stream -> (epoch, list index, True)."""
  num_examples: int
  global_batch: int
  first_row: int
  rows: int
  seed: int
  start_epoch: int

  def __call__(self, k: int) -> tuple[int, int, bool]:
    step, row = divmod(k, self.rows)
    epochs_done, step_in_epoch = divmod(step, steps_per_epoch(self.num_examples, self.global_batch))
    epoch = self.start_epoch + epochs_done
    position = step_in_epoch * self.global_batch + self.first_row + row
    return epoch, int(epoch_permutation(self.seed, epoch, self.num_examples)[position]), True


@dataclasses.dataclass(frozen=True)
class EvalLocator:
  """k-th example of this process's share of the list -> (epoch, list index, valid).
  Padding rows repeat the last image (same index, hence same augmentation) with valid=False."""
  num_examples: int
  global_batch: int
  first_row: int
  rows: int
  epoch: int

  def __call__(self, k: int) -> tuple[int, int, bool]:
    step, row = divmod(k, self.rows)
    position = step * self.global_batch + self.first_row + row
    valid = position < self.num_examples
    return self.epoch, min(position, self.num_examples - 1), valid


# ------------------------------------------------------------------ data worker processes
# A scheduler's preemption signal (slurm's --signal=TERM, scancel, a terminal's Ctrl-C) goes to the
# whole process group. Decoding workers must not die of it: the main process finishes its step,
# writes a checkpoint and exits 75 (run.py), and a worker killed under it would end the run with
# "Worker process was terminated unexpectedly" instead. So workers ignore SIGINT and SIGTERM, and
# end when the main process closes their iterator, or when it is gone. A worker still starting
# (a fresh interpreter: the parent's blocked mask is not inherited) can die of the signal before
# it ignores it; the run then stops at its last finished step all the same (run.Run.next_batch).
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_WORKER_PREFIX = "grain-process-prefetch"   # grain's name of its worker processes
_exit_guard = []   # the main process's exit hook, registered once


def _worker_init(index: int, count: int) -> None:
  """In each worker process, before it reads data: ignore the stop signals, and exit when the
  main process is gone (its parent's end no longer reaches it as a SIGTERM)."""
  del index, count
  for sig in _STOP_SIGNALS:
    signal.signal(sig, signal.SIG_IGN)
  parent = multiprocessing.parent_process()
  if parent is not None:
    threading.Thread(target=_exit_when_gone, args=(parent.sentinel,), daemon=True,
                     name="eercl-parent-watch").start()


def _exit_when_gone(sentinel: int) -> None:
  multiprocessing.connection.wait([sentinel])   # ready when the main process has ended
  os.kill(os.getpid(), signal.SIGKILL)          # nobody reads this worker's output any more


def _stop_leftover_workers() -> None:
  """At the main process's exit, after grain closed the iterators it still knew of: a worker
  left running (its iterator dropped unclosed) is killed, since the SIGTERM of multiprocessing's
  own exit, which it ignores, would leave the exit waiting for it forever."""
  for p in multiprocessing.active_children():
    if p.name.startswith(_WORKER_PREFIX) and p.is_alive():
      p.kill()
      p.join(5)


def _guard_exit() -> None:
  if not _exit_guard:
    # exitpriority 0: after grain's own closing finalizers (1), before multiprocessing
    # terminates and joins the remaining children.
    _exit_guard.append(multiprocessing.util.Finalize(None, _stop_leftover_workers,
                                                     exitpriority=0))


class _BatchIterator(grain.DatasetIterator):
  """Iterates `batches[next_batch:]` through grain's prefetching.

  Its state is just the number of batches consumed. grain's own state for `mp_prefetch` is per
  worker, is rejected by an in-process iterator and is silently misread by one with a different
  worker count; a batch count restores exactly whatever `num_workers` the resumed run uses.
  Worker processes ignore SIGINT/SIGTERM (see `_worker_init`).
  """

  def __init__(self, batches: grain.MapDataset, num_workers: int, prefetch: int):
    super().__init__()
    self._batches, self._num_workers, self._prefetch = batches, num_workers, prefetch
    self._next_batch = 0
    self._inner = None  # started lazily, so set_state right after iter() starts workers once

  def _start(self):
    ds = self._batches[self._next_batch:]
    # grain's default read options prefetch 500 elements (here: batches), far too many images.
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=self._prefetch,
                                              prefetch_buffer_size=self._prefetch))
    if self._num_workers > 0:
      # grain reads its absl flags when it starts workers: outside an absl program they must
      # be marked parsed first (tools/cli.grain_workers_ready; tests: conftest).
      _guard_exit()
      it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._num_workers),
                          worker_init_fn=_worker_init)
    return iter(it)

  def __next__(self) -> dict:
    self._assert_not_closed()
    if self._inner is None:
      self._inner = self._start()
    batch = next(self._inner)
    self._next_batch += 1
    return batch

  def get_state(self) -> dict:
    return {"next_batch": self._next_batch}

  def set_state(self, state: dict) -> None:
    self._close_inner()
    self._next_batch = int(state["next_batch"])

  def _close_inner(self):
    if self._inner is not None:
      self._inner.close()
      self._inner = None

  def close(self) -> None:
    self._close_inner()
    super().close()


class _BatchDataset(grain.IterDataset):
  """An IterDataset over a MapDataset of batches whose iterators resume by batch count."""

  def __init__(self, batches: grain.MapDataset, num_workers: int, prefetch: int):
    super().__init__()
    self._batches, self._num_workers, self._prefetch = batches, num_workers, prefetch

  def __iter__(self) -> _BatchIterator:
    return _BatchIterator(self._batches, self._num_workers, self._prefetch)


def _finish(ds: grain.MapDataset, rows: int, num_workers: int | None,
            prefetch: int | None) -> _BatchDataset:
  num_workers, prefetch = host.resolve(num_workers, prefetch)   # None: follow the host's cores
  # Batch before leaving MapDataset land: mp_prefetch hands whole batches to workers
  # round-robin, so a batch never mixes examples from different workers.
  return _BatchDataset(ds.batch(rows, drop_remainder=True), num_workers, prefetch)


# ------------------------------------------------------------------------------ public API


def train_dataset(fer_list: FerList, *, views: Sequence[str], view_cfg: ViewConfig,
                  global_batch: int, seed: int, start_epoch: int = 0, process_index: int = 0,
                  process_count: int = 1, num_workers: int | None = 0,
                  prefetch: int | None = 2) -> grain.IterDataset:
  """Infinite stream of this process's rows of each global batch.

  Epoch e (from `start_epoch` on) visits the list in the order `epoch_permutation(seed, e)` and
  drops its incomplete last global batch. `iter(ds)` supports get_state()/set_state(); the state
  ({'next_batch': n}) fits any dataset built with the same arguments except num_workers/prefetch
  (None for either: follow the host's cores, `data/host.py`).
  """
  views = tuple(views)
  for v in views:
    if v not in VIEWS:
      raise ValueError(f"unknown view {v!r}; expected one of {VIEWS}")
  first_row, rows = process_rows(global_batch, process_index, process_count)
  if len(fer_list) < global_batch:
    raise ValueError(f"{fer_list.list_path}: {len(fer_list)} images, fewer than one global "
                     f"batch of {global_batch}")
  locate = _TrainLocator(len(fer_list), global_batch, first_row, rows, seed, start_epoch)
  ds = (grain.MapDataset.range(sys.maxsize)
        .map(locate)
        .map(_Example(fer_list, views, view_cfg, seed, with_valid=False)))
  return _finish(ds, rows, num_workers, prefetch)


def eval_batches(fer_list: FerList, *, view: str, view_cfg: ViewConfig, batch_size: int,
                 seed: int = 0, epoch: int = 0, process_index: int = 0, process_count: int = 1,
                 num_workers: int | None = 0, prefetch: int | None = 2,
                 images=None) -> Iterator[dict]:
  """One pass over the list in order, global batches of `batch_size` (the last one padded, see
  `valid`); this process gets its rows of each. Keys: image, label, index, valid. `images`
  (indexable by list index) replaces the list's own pixels, e.g. a resident array."""
  if view not in ("test", "weak"):
    raise ValueError(f"eval view must be 'test' or 'weak', got {view!r}")
  first_row, rows = process_rows(batch_size, process_index, process_count)
  num_batches = -(-len(fer_list) // batch_size)
  locate = EvalLocator(len(fer_list), batch_size, first_row, rows, epoch)
  ds = (grain.MapDataset.range(num_batches * rows)
        .map(locate)
        .map(_Example(fer_list, (view,), view_cfg, seed, with_valid=True, images=images)))
  return iter(_finish(ds, rows, num_workers, prefetch))


@dataclasses.dataclass(frozen=True)
class Loader:
  """How this process reads a run's lists, from `config.data` once: the views' sizes, the grain
  worker processes and prefetch depth (None: follow the host's cores), and this process's share
  of every global batch. The stages, the evaluator and the refresh read every list through it."""
  view_cfg: ViewConfig
  num_workers: int | None = 0
  prefetch: int | None = 2
  process_index: int = 0
  process_count: int = 1

  @classmethod
  def from_config(cls, data_config) -> "Loader":
    import jax  # pylint: disable=import-outside-toplevel
    return cls(view_config(data_config), data_config.num_workers, data_config.prefetch,
               jax.process_index(), jax.process_count())

  def train(self, fer_list: FerList, views: Sequence[str], global_batch: int,
            seed: int) -> grain.DatasetIterator:
    """An iterator over `train_dataset` (state: get_state/set_state)."""
    return iter(train_dataset(fer_list, views=views, view_cfg=self.view_cfg,
                              global_batch=global_batch, seed=seed,
                              process_index=self.process_index, process_count=self.process_count,
                              num_workers=self.num_workers, prefetch=self.prefetch))

  def eval(self, fer_list: FerList, view: str, batch_size: int, seed: int = 0, epoch: int = 0,
           images=None) -> Iterator[dict]:
    """`eval_batches` of the list (resident `images`: read in-process, no workers)."""
    return eval_batches(fer_list, view=view, view_cfg=self.view_cfg, batch_size=batch_size,
                        seed=seed, epoch=epoch, process_index=self.process_index,
                        process_count=self.process_count,
                        num_workers=0 if images is not None else self.num_workers,
                        prefetch=self.prefetch, images=images)
