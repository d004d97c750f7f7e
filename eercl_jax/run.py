"""The run skeleton both stages share: everything around the training step that is I/O.

A stage's loop reads

    run = Run(config, workdir, "source")            # log file, writer, mesh, config check
    train_list, evals = run.read_lists()
    stage = build(config, run.mesh)                 # model, optimiser, initial state, step
    run.set_evaluation(stage.model, evals)
    state, record, iterator_state = run.resume(state, record)
    for step in run.steps():
      ...the stage's own logic and its jitted step...
      run.end_of_step(step, state, metrics, iterator, record)
    return run.finish(state)

and `end_of_step` decides, with the one predicate `itstime`, when to log, to evaluate (and keep
the best checkpoint by `config.data.select_by`, ties going to the later step as the original),
and to checkpoint for resuming.

Step numbering, the same in both stages: `step` counts optimiser steps done, 1-based; the step
function is called with `state.step == step - 1` and returns `state.step == step`. Logs,
TensorBoard, evaluations and checkpoints are labelled with `step`. (The original's iteration
index `it` is `step - 1`.)

A stage keeps what else it must remember across a resume in a typed record: a dataclass whose
fields are saved in each checkpoint's metadata and restored with it.

Cluster safety, also here: process 0 holds an exclusive lock on the workdir for the run's
lifetime; no state with a non-finite value is ever saved (the run stops with an error naming
the step and the non-finite terms, and the last good checkpoint stays); SIGTERM / SIGINT finish
the current step, write a checkpoint and exit with `constants.EXIT_PREEMPTED` (75), so a
scheduler can requeue the same command, which resumes. A scheduler signals the whole process
group: the data worker processes ignore both signals (data/pipelines.py) and end with the run;
one still starting may die of it: after a stop request, a failed read of the next batch stops at
the last finished step (`Run.next_batch`) and a failed evaluation is done again.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import threading
import time
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from eercl_jax import (checkpoints, config_defaults, constants, evaluation, logs, optim, parallel,
                       pictures, records, selection)
from eercl_jax.data import host, packed, pipelines, run_lists
from eercl_jax.errors import CheckpointError, DataError
from eercl_jax.models import registry


def itstime(step: int, every: int, total: int | None = None) -> bool:
  """Is a periodic action due after `step`? At every multiple of `every`, and at the last step
  `total` when given."""
  return (every > 0 and step % every == 0) or (total is not None and step == total)


class Preempted(SystemExit):
  """Raised after the checkpoint of a SIGTERM / SIGINT is written: exits with
  `constants.EXIT_PREEMPTED` (launch/slurm.sbatch requeues on it)."""

  def __init__(self, signum: int, step: int):
    super().__init__(constants.EXIT_PREEMPTED)
    self.signum, self.step = signum, step


class WorkdirLock:
  """An exclusive lock file `<workdir>/run.lock` naming its holder's host and pid.

  A second run on the same workdir is refused with the holder's name; a lock whose process is
  gone (same host, pid not alive) is stale and taken over, and so is one that names no holder
  (empty or unreadable: a run that died between creating and writing it, e.g. on a full disk)
  once it is older than `GRACE_S` (younger, its creator may be writing it right now). Re-entrant
  within one process (a process runs one loop at a time). Only process 0 of a multi-process run
  takes it.
  """

  GRACE_S = 2.0   # a creator writes its lock microseconds after creating it

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, constants.LOCK_FILE)
    self.held = False

  def acquire(self) -> None:
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    deadline = time.monotonic() + 4 * self.GRACE_S
    while True:
      if time.monotonic() > deadline:   # other runs keep taking and dropping it
        raise RuntimeError(f"could not take the lock {self.path}; delete it if no run uses "
                           "this workdir")
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self._holder()
        if holder == me:
          break
        if holder is None:
          age = _age(self.path)
          if age is None:                 # removed meanwhile: try again
            continue
          if age < self.GRACE_S:          # being written by its creator right now: look again
            time.sleep(0.05)
            continue
          logging.warning("taking over the lock %s: it names no holder (empty or unreadable, "
                          "left by a run that died while creating it)", self.path)
          _remove(self.path)
          continue
        if holder.get("host") == me["host"] and not _pid_alive(holder.get("pid")):
          logging.warning("taking over the stale lock %s of %s (process gone)", self.path, holder)
          _remove(self.path)
          continue
        raise RuntimeError(
            f"workdir {os.path.dirname(self.path)!r} is in use by another run (host "
            f"{holder.get('host')}, pid {holder.get('pid')}); wait for it, use another "
            f"--workdir, or delete {self.path} if that run is dead") from None
      with os.fdopen(fd, "w") as f:
        json.dump(me, f)
      break
    self.held = True
    atexit.register(self.release)

  def release(self) -> None:
    if self.held and self.mine():
      _remove(self.path)
    self.held = False

  def mine(self) -> bool:
    """Whether the lock file names this process."""
    return self._holder() == {"host": socket.gethostname(), "pid": os.getpid()}

  def _holder(self) -> dict | None:
    """{'host', 'pid'} of the lock file; None when it is missing, empty or names no holder."""
    try:
      with open(self.path) as f:
        holder = json.load(f)
    except (OSError, ValueError):
      return None
    if not isinstance(holder, dict) or not {"host", "pid"} <= set(holder):
      return None
    return holder


def _age(path: str) -> float | None:
  """Seconds since `path` was last written; None when it is gone."""
  try:
    return time.time() - os.stat(path).st_mtime
  except FileNotFoundError:
    return None


def _pid_alive(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except (ProcessLookupError, ValueError, TypeError):
    return False
  except PermissionError:   # alive, owned by someone else
    return True
  return True


def _remove(path: str) -> None:
  try:
    os.remove(path)
  except FileNotFoundError:
    pass


def train_pixels(train_list) -> dict:
  """How a run's training images reach its views, recorded in its checkpoints and checked on
  resuming (`checkpoints.check_resume_pixels`): {'format': 'folder' | 'packed', 'stored_size':
  None (as decoded) | R (a packed set stored resized), 'set': the packed set's folder}."""
  if not train_list.packed_dir:
    return {"format": "folder", "stored_size": None, "set": None}
  return {"format": "packed", "stored_size": packed.read_meta(train_list.packed_dir)["stored_size"],
          "set": train_list.packed_dir}


# Workdirs (absolute) in which this process ended a training step: a failure after that keeps
# the run folder (its log, TensorBoard, checkpoints), one before it need not.
_STEPPED: set[str] = set()


@contextlib.contextmanager
def removed_if_failed_early(workdir: str) -> Iterator[None]:
  """Around a training run's start and loop: when it fails before its first step ended and
  `workdir` was new - absent or empty before - what the start wrote there (config.json, logs/,
  tensorboard/, the empty checkpoint folders, the lock) is removed, with the folders above it
  that the start created and left empty, so a mistake leaves no run folder behind. A workdir
  that held anything (a run to resume) is never touched; nor is anything after a first step."""
  workdir = os.path.abspath(workdir)
  created = []   # the workdir and its ancestors that do not exist yet, deepest first
  folder = workdir
  while not os.path.exists(folder):
    created.append(folder)
    folder = os.path.dirname(folder)
  was_empty = not created and os.path.isdir(workdir) and not os.listdir(workdir)
  try:
    yield
  except BaseException:
    if (created or was_empty) and workdir not in _STEPPED and jax.process_index() == 0:
      _remove_start(workdir, created)
    raise


def _remove_start(workdir: str, created: Sequence[str]) -> None:
  # Only what this process wrote under its own lock: a run started on the same new workdir at
  # the same moment, which holds the lock, keeps its files.
  mine = WorkdirLock(workdir).mine()
  if created:
    if mine:
      shutil.rmtree(workdir, ignore_errors=True)
    for folder in created[1 if mine else 0:]:   # the folders it needed, while empty
      try:
        os.rmdir(folder)
      except OSError:
        break
  elif mine:
    for name in os.listdir(workdir):
      path = os.path.join(workdir, name)
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
      else:
        _remove(path)


@jax.jit
def _finite_leaves(tree):
  """A bool per floating-point leaf: all its values are finite (one device reduction)."""
  return [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
          if jnp.issubdtype(x.dtype, jnp.inexact)]


def non_finite_paths(tree) -> list[str]:
  """Paths of the floating-point leaves of `tree` holding a NaN or an infinity."""
  paths = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
           if jnp.issubdtype(x.dtype, jnp.inexact)]
  ok = jax.device_get(_finite_leaves(tree))
  return [p for p, fine in zip(paths, ok) if not fine]


@dataclasses.dataclass
class Best:
  """The best evaluation so far by one selection rule (step -1: none yet), with the scores of
  every list at that step ({name: {'accuracy', 'mean_class_accuracy'}})."""
  value: float = -1.0
  step: int = -1
  lists: dict = dataclasses.field(default_factory=dict)

  def improved_by(self, value: float) -> bool:
    # Ties go to the later checkpoint, as the original's ClsBestAccuracyByTest.
    return self.step < 0 or value >= self.value


def selection_rule(select_by: str) -> str:
  """The selection rule of `config.data.select_by`: 'oracle' for the accuracy of the target
  list (it uses target labels), a label-free score's name, or the named list's accuracy."""
  return "oracle" if select_by == "target" else select_by


def best_folder(rule: str, main_rule: str) -> str:
  """The checkpoint folder of a rule's best step: best/ for the run's own rule
  (config.data.select_by), best_<rule>/ for the others an adaptation run keeps."""
  return "best" if rule == main_rule else f"best_{rule}"


class Run:
  """One run's I/O: start-up, resume, periodic logging / evaluation / checkpoints, summary.

  stage:          'source' or 'adapt' (log and summary labels).
  log_keys:       (metric, label, format) of the training scalars on the log line.
  ratios:         {scalar: (numerator, denominator)}: scalars logged as a ratio of two summed
                  `count/...` metrics over the logging window (NaN when the denominator is 0),
                  rather than a mean of per-step ratios.
  selection_note: appended where the best checkpoint's selection is reported (the adaptation's
                  selection by target accuracy uses target labels: an oracle).
  label_free:     keep, beside the `config.data.select_by` rule (best/), a best checkpoint by
                  every other rule of an adaptation: the oracle (target accuracy) and the
                  label-free scores of selection.py, logged at every evaluation (best_<rule>/).
  """

  def __init__(self, config, workdir: str, stage: str,
               log_keys: Sequence[tuple[str, str, str]] = (("train/loss", "loss", ".4f"),),
               ratios: Mapping[str, tuple[str, str]] | None = None, selection_note: str = "",
               label_free: bool = False):
    self.config, self.workdir, self.stage = config, workdir, stage
    self.log_keys, self.selection_note = tuple(log_keys), selection_note
    self.ratios = dict(ratios or {})
    os.makedirs(workdir, exist_ok=True)
    self.lock = WorkdirLock(workdir)
    if jax.process_index() == 0:
      self.lock.acquire()
    logs.setup_file_log(workdir)
    # Imported here: clu's writers import TensorFlow, which only a run needs.
    from eercl_jax import event_files  # pylint: disable=import-outside-toplevel
    self.writer = event_files.create_writer(workdir)
    self.mesh = parallel.create_mesh()
    config_defaults.validate(config, self.mesh.devices.size, jax.process_count())
    logging.info("config (recorded in %s once the run starts):\n%s",
                 os.path.join(workdir, constants.CONFIG_FILE), config)
    self.main_rule = selection_rule(config.data.select_by)
    self.rules = [self.main_rule]
    if label_free:
      self.rules += [r for r in ("oracle", *selection.LABEL_FREE) if r != self.main_rule]
    self.ckpt = checkpoints.RunCheckpoints(
        workdir, keep=config.keep_checkpoints,
        extra_best=[best_folder(r, self.main_rule) for r in self.rules[1:]])
    self.best = Best()                 # by the run's own rule (best/)
    self.bests = {r: Best() for r in self.rules[1:]}
    self.history: list[dict] = []      # every evaluation's selection values
    self.start_step = 0
    self.results: dict[str, dict] = {}
    # {'list', 'count', 'fingerprint'} of the training list once read: in every checkpoint, and
    # compared at resume (a list edited in place would pair the state with other images).
    self.train_list: dict | None = None
    self._running = logs.MeanMetrics()
    self._progress = logs.Progress(0, config.num_steps)
    self._schedule = optim.make_schedule(config.optim, config.num_steps)
    self._backbone_mult = registry.lr_mult(config.model, config.optim)["backbone"]
    self.loader = pipelines.Loader.from_config(config.data)
    self.evaluator: evaluation.Evaluator | None = None
    self._evals = None
    self._last_scalars: dict[str, float] = {}
    self._stop_signal = 0
    self._last: tuple | None = None   # (step, state, iterator, record) of the last end_of_step
    self._finite_step = -1   # the last step whose state was found finite
    self._views_shown = False
    self._train_pixels: dict | None = None   # how the training images reach the views
    self._started, self._elapsed_before = time.time(), 0.0   # wall time, over resumes
    # Input wait: seconds the step loop spent in `next_batch` since the last log line.
    self._input_wait, self._window_start = 0.0, time.perf_counter()
    workers, prefetch = host.from_config(config.data)
    logging.info("input pipeline: %d grain worker(s), prefetch %d (config.data.num_workers=%s, "
                 "prefetch=%s; None follows the host's %d cores)", workers, prefetch,
                 config.data.num_workers, config.data.prefetch, host.available_cores())
    self._install_signal_handlers()

  # -------------------------------------------------------------------------------- start-up

  def _record_config(self, config, workdir: str) -> None:
    """config.json and the config in TensorBoard's hparams; a results.json of an earlier finish
    is removed (the run is not finished while it continues). Once the resume checks passed: a
    refused resume leaves the run's record as it was."""
    records.write_config(workdir, config)
    self.writer.write_hparams(records.hparams(config))
    if jax.process_index() == 0:
      _remove(os.path.join(workdir, constants.RESULTS_FILE))

  def read_lists(self):
    """(training list, {name: evaluation list}) of the run, read and checked before any
    training; the built-in synthetic set is generated first when the config asks for it."""
    run_lists.prepare(self.config.data)
    train, evals = run_lists.read_run_lists(self.config.data)
    self.train_list = {"list": train.list_path, "count": len(train),
                       "fingerprint": packed.list_fingerprint(train)}
    self._train_pixels = train_pixels(train)
    return train, evals

  def set_evaluation(self, model, evals: dict,
                     evaluator: evaluation.Evaluator | None = None) -> None:
    """The model whose eval-mode predictions are scored on `evals` ({name: FerList}), through
    `evaluator` (default: built from the config)."""
    self.evaluator = evaluator or evaluation.Evaluator.from_config(self.config, model, self.mesh)
    self._evals = evals

  def resume(self, state: Any, record: Any = None) -> tuple[Any, Any, Any]:
    """(state, record, iterator state) of the workdir's latest readable checkpoint; the given
    initial state and record (and None) when there is none. The checkpoint's model must match
    the config, the config may differ from the checkpoint's only in fields that change neither
    shapes nor the data stream (`checkpoints.check_resume_config`), and the training list must
    be the one it was trained on (`check_train_list`). An unreadable latest step falls back to
    the previous one (`_restore_readable`)."""
    iterator_state = None
    restored = self._restore_readable(state)
    if restored is not None:
      state, data, meta = restored
      self.best = Best(**meta.get("best", {}))
      self.bests.update({r: Best(**b) for r, b in meta.get("selections", {}).items()
                         if r in self.bests})
      self.history = list(meta.get("history", []))
      self._elapsed_before = float(meta.get("elapsed_s", 0.0))
      if record is not None:
        fields = {f.name for f in dataclasses.fields(record)}
        record = dataclasses.replace(record, **{k: v for k, v in meta.items() if k in fields})
      if data.get("iterator") is not None:
        iterator_state = checkpoints.decode_data_state(data["iterator"])
      logging.info("resumed from %s at step %d (%s stage)", self.ckpt.latest.directory,
                   int(state.step), self.stage, extra=logs.SHOW)
    self.start_step = int(state.step)
    self._record_config(self.config, self.workdir)
    dropped = self.ckpt.drop_best_after(self.start_step)
    if dropped:
      logging.info("best/ held step(s) %s past the resumed step %d (a kill between saves): "
                   "dropped, they are recomputed", dropped, self.start_step)
    self._progress = logs.Progress(self.start_step, self.config.num_steps)
    self._input_wait, self._window_start = 0.0, time.perf_counter()
    # TensorBoard: this session starts at the next step; what an earlier session logged from
    # there on (past its last checkpoint, before it was killed) is discarded, not shown twice.
    self.writer.start_session(self.start_step + 1)
    return state, record, iterator_state

  def _restore_readable(self, state: Any):
    """(state, data, meta) of the newest step of checkpoints/ whose files read, or None when
    there is none. Each step's metadata is checked before its state is restored (the restore's
    shape errors would not say which setting differs). Unreadable newer steps (truncated or
    damaged files) are moved to <workdir>/unreadable_checkpoints/ with a warning naming them;
    when no step reads, the run refuses with one line naming the step folder(s)."""
    bad: list[checkpoints.UnreadableCheckpoint] = []
    for step in self.ckpt.steps():
      where = checkpoints.step_folder(str(self.ckpt.latest.directory), step)
      try:
        meta = self.ckpt.meta_at(step)
        checkpoints.check_model_meta(meta, self.config, where)
        checkpoints.check_resume_config(meta.get("config", {}), self.config, step, where)
        self.check_train_list(meta, where)
        checkpoints.check_resume_pixels(meta, self._train_pixels, step, where)
        restored = self.ckpt.restore_at(step, checkpoints.abstract_like(state))
      except checkpoints.UnreadableCheckpoint as e:
        logging.error("%s", e)
        bad.append(e)
        continue
      if bad:
        self._set_aside(bad, step)
      return restored
    if not bad:
      return None
    if len(bad) == 1:
      e = bad[0]
      raise CheckpointError(
          f"cannot resume: the checkpoint folder {e.folder} (step {e.step}) is unreadable "
          f"({e.cause}) and there is no older checkpoint to fall back to "
          f"(config.keep_checkpoints={self.config.keep_checkpoints}): restore the folder from a "
          "copy, or delete it to start the run from scratch")
    raise CheckpointError(
        "cannot resume: every checkpoint is unreadable: "
        + "; ".join(f"{e.folder} ({e.cause})" for e in bad)
        + f": restore them from a copy, or delete {self.ckpt.latest.directory} to start the run "
        "from scratch")

  def _set_aside(self, bad: list, step: int) -> None:
    """Moves the unreadable steps newer than `step` out of checkpoints/ (orbax would refuse to
    save those steps again), saying so loudly."""
    if jax.process_count() > 1:   # every process has finished reading them
      multihost_utils.sync_global_devices("unreadable checkpoints found")
    for e in bad:
      moved = (self.ckpt.set_aside(e.step, self.workdir) if jax.process_index() == 0
               else "<moved by process 0>")
      logging.warning(
          "UNREADABLE CHECKPOINT %s (step %d: %s): resuming from the previous intact step %d "
          "instead (the steps after it are recomputed); the unreadable folder is moved to %s "
          "(delete it once looked at)", e.folder, e.step, e.cause, step, moved)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("unreadable checkpoints set aside")
    self.ckpt.reload()

  def check_train_list(self, meta: dict, where: str) -> None:
    """The training list read by this run (`read_lists`) against the one recorded in the
    checkpoint `where` (its count and fingerprint, `packed.list_fingerprint`): a list edited in
    place since is refused in one line (checkpoints of older versions record none)."""
    have, want = meta.get("train_list"), self.train_list
    if not have or want is None or have.get("fingerprint") == want["fingerprint"]:
      return
    what = (f"count {have.get('count')} -> {want['count']}" if have.get("count") != want["count"]
            else "same count, different entries or order")
    raise DataError(
        f"the training list {want['list']} changed since the checkpoint {where} was written "
        f"({what}): resuming would pair the checkpoint's per-image state (data order, banks) "
        "with other images; restore the list, or use a new --workdir")

  def steps(self) -> range:
    """The steps still to do, 1-based (see the module docstring)."""
    return range(self.start_step + 1, self.config.num_steps + 1)

  # -------------------------------------------------------------------------- periodic work

  def next_batch(self, iterator) -> Any:
    """`next(iterator)`, timing how long the step loop waits for its input: the share of
    the wall time spent here is logged as `train/input_wait` (near 1: the host is the limit)."""
    t0 = time.perf_counter()
    try:
      batch = next(iterator)
    except Exception:  # pylint: disable=broad-except
      self._stop_if_workers_took_the_signal()
      raise
    self._input_wait += time.perf_counter() - t0
    return batch

  def _workers_took_the_signal(self, what: str) -> bool:
    """Whether a failure of `what` follows a stop request, in a single-process run: then it is a
    data worker that was still starting (not yet ignoring the stop signals, data/pipelines.py)
    killed by the same group signal, not an error of the run."""
    if not self._stop_signal or jax.process_count() > 1:
      return False
    logging.warning("%s failed after %s: a data worker that was starting took the signal too",
                    what, signal.Signals(self._stop_signal).name)
    return True

  def _stop_if_workers_took_the_signal(self) -> None:
    """Called when reading the next batch failed. After a stop request, that is a data worker
    killed by the same group signal - one still starting, before it ignores the stop signals
    (data/pipelines.py) - and part of the stop: the iterator's state is a batch count, so the
    checkpoint of the last finished step needs no worker. One process only (the others could
    not agree on the step); otherwise the error stands."""
    if not self._workers_took_the_signal("reading the next batch"):
      return
    logging.warning("stopping at the last finished step")
    if self._last is None:   # no step finished in this process: its start is the checkpoint
      self._stop(self.start_step)
    step, state, iterator, record = self._last
    if self.ckpt.latest_step() != step:
      self.save(step, state, iterator, record)
    self._stop(step)

  def end_of_step(self, step: int, state: Any, metrics: dict, iterator: Any,
                  record: Any = None) -> None:
    """After step `step`: accumulate its metrics; log, evaluate (+ best checkpoint) and
    checkpoint when each is due."""
    c = self.config
    _STEPPED.add(os.path.abspath(self.workdir))
    self._running.add(metrics)
    logged = itstime(step, c.log_every, c.num_steps)
    if logged:
      self.log_training(step)
      self.check_finite(step, state)
    if itstime(step, c.eval_every, c.num_steps):
      try:
        self.evaluate_and_select(step, state, record)
      except Exception:  # pylint: disable=broad-except
        if not self._workers_took_the_signal("the evaluation"):
          raise
        # The failure was reading the evaluation lists (nothing written yet); their fresh
        # workers start with the signal already past.
        self.evaluate_and_select(step, state, record)
    saved = itstime(step, c.checkpoint_every, c.num_steps)
    if saved:
      self.save(step, state, iterator, record)
    # Kept for a stop found while reading the next batch (`next_batch`): references only, the
    # step function has not taken (donated) this state yet when that happens.
    self._last = (step, state, iterator, record)
    if self._stop_requested(logged):
      if not saved:
        self.save(step, state, iterator, record)
      self._stop(step)

  def log_training(self, step: int) -> dict[str, float]:
    """Means over the steps since the last log, plus the `ratios` of summed counts."""
    means, sums = self._running.pop()
    scalars = {k: v for k, v in means.items() if not k.startswith("count/")}
    for name, (num, den) in self.ratios.items():
      scalars[name] = sums[num] / sums[den] if sums[den] > 0 else float("nan")
    rate, eta = self._progress.tick(step)
    scalars["train/steps_per_sec"] = rate
    now = time.perf_counter()   # input wait / wall time of the window since the last log
    scalars["train/input_wait"] = self._input_wait / max(now - self._window_start, 1e-9)
    self._input_wait, self._window_start = 0.0, now
    # The learning rate of the step just taken (its schedule index is step - 1).
    scalars["train/lr"] = float(self._schedule(step - 1)) * self._backbone_mult
    self.writer.write_scalars(step, scalars)
    self._last_scalars = scalars
    # A ratio of counts is NaN when its denominator is 0 (the original logs NaN too): no alarm.
    bad = sorted(k for k, v in scalars.items() if not np.isfinite(v) and k not in self.ratios)
    if bad:
      logging.warning("step %d: non-finite logged terms %s", step, bad)
    shown = " ".join(f"{label}={scalars[key]:{fmt}}" for key, label, fmt in self.log_keys
                     if key in scalars)
    logging.info("step %d/%d %s lr=%.2e %.2f steps/s input_wait=%.0f%% ETA %s", step,
                 self.config.num_steps, shown, scalars["train/lr"], rate,
                 100 * scalars["train/input_wait"], eta, extra=logs.SHOW)
    return scalars

  def evaluate(self, step: int, variables: dict, save_confusions: bool = True) -> dict:
    """Scores `variables` on every evaluation list (and the label-free scores of the target's
    predictions, when the run keeps them); writes the scalars, the pictures, a row of
    metrics.csv (and the confusions)."""
    label_free = ("target",) if len(self.rules) > 1 else ()
    results = self.evaluator.evaluate(variables, self._evals, label_free=label_free, show=True)
    self.writer.write_scalars(step, evaluation.scalars(results))
    class_names = self.config.data.class_names
    if jax.process_index() == 0:   # the confusion images and per-class scalars, metrics.csv
      pictures.write_evaluation(self.writer, step, results, class_names,
                                {k: fl.list_path for k, fl in self._evals.items()})
      self.write_metrics_row(step, results)
    if save_confusions:
      evaluation.save_confusions(self.workdir, step, results, class_names)
    return results

  # A resumed run recomputes the evaluations after its checkpoint: metrics.csv drops the rows
  # of those steps (written by the killed attempt) before its first new row.
  _metrics_pruned = False

  def write_metrics_row(self, step: int, results: dict) -> None:
    """Appends the evaluation of `step` to `<workdir>/metrics.csv`: step, each list's accuracy,
    mean class accuracy and macro F1, the label-free scores (target_im, target_snd) when
    computed, the run's wall time (fractions in 0..1, seconds)."""
    table = logs.MetricsCsv(os.path.join(self.workdir, constants.METRICS_FILE))
    if not self._metrics_pruned:
      self._metrics_pruned = True
      # Rows up to the resumed step stay; with no checkpoint (step 0) nothing is kept.
      dropped = table.prune(self.start_step, keep_last=self.start_step > 0)
      if dropped:
        logging.info("%s: dropped %d row(s) after step %d (the attempt that wrote them stopped "
                     "before its next checkpoint; they are recomputed)", table.path, dropped,
                     self.start_step)
    row = {"step": int(step)}
    for name, r in results.items():
      for key in ("accuracy", "mean_class_accuracy", "macro_f1", *selection.LABEL_FREE):
        if key in r:
          row[f"{name}_{key}"] = float(r[key])
    row["wall_time_s"] = round(self._elapsed(), 3)
    table.append(row)

  def show_views(self, step: int, host_batch: dict) -> None:
    """Once per process start: a grid of the first images of each training view of
    `host_batch` (weak; weak, strong1, strong2), written at the step before `step`."""
    if self._views_shown:
      return
    self._views_shown = True
    if jax.process_index() == 0:
      keys = [k for k in ("image", "weak", "strong1", "strong2") if k in host_batch]
      pictures.write_views(self.writer, step - 1, host_batch, keys,
                           class_names=self.config.data.class_names)

  def check_finite(self, step: int, state: Any) -> None:
    """Stops the run if the state holds a NaN or an infinity, naming the step, the parameters
    and the training terms that are not finite; nothing of it has been saved."""
    if step == self._finite_step:   # log, evaluation and save of one step: check once
      return
    bad = non_finite_paths(state)
    if not bad:
      self._finite_step = step
      return
    terms = sorted(k for k, v in self._last_scalars.items() if not np.isfinite(v))
    raise FloatingPointError(
        f"non-finite values in the training state at step {step} (the last logged terms that "
        f"are not finite: {terms or 'none'}): {', '.join(bad[:8])}"
        + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        + f"; the last good checkpoint in {self.ckpt.latest.directory} is kept")

  def rule_value(self, rule: str, results: dict) -> float:
    """The value a selection rule maximises in an evaluation's `results`."""
    if rule == "oracle":
      return results["target"]["accuracy"]
    if rule in selection.LABEL_FREE:
      return results["target"][rule]
    return results[rule]["accuracy"]

  def evaluate_and_select(self, step: int, state: Any, record: Any = None) -> dict:
    self.check_finite(step, state)
    self.results = self.evaluate(step, _variables(state))
    lists = {k: records.scores(r) for k, r in self.results.items()}
    values = {rule: self.rule_value(rule, self.results) for rule in self.rules}
    self.history.append({"step": step, **values})
    for rule, value in values.items():
      best = self.best if rule == self.main_rule else self.bests[rule]
      if not best.improved_by(value):
        continue
      best = Best(value, step, lists)
      if rule == self.main_rule:
        self.best = best
      else:
        self.bests[rule] = best
      self.ckpt.save(step, state, {"iterator": None},
                     self._meta(step, record, selected_by=rule,
                                selection=describe_rule(rule)),
                     best=best_folder(rule, self.main_rule))
    shown = "; ".join(
        f"{describe_rule(r)} {v:.4f} (best {b.value:.4f} at step {b.step})"
        for r, v, b in ((r, values[r], self.best if r == self.main_rule else self.bests[r])
                        for r in self.rules))
    logging.info("step %d selection: %s", step, shown, extra=logs.SHOW)
    return self.results

  def save(self, step: int, state: Any, iterator: Any, record: Any = None) -> None:
    """A resumable checkpoint: state, the iterator's position, the record."""
    self.check_finite(step, state)
    data = {"iterator": checkpoints.encode_data_state(iterator.get_state())}
    self.ckpt.save(step, state, data, self._meta(step, record))

  def _meta(self, step: int, record: Any, **extra) -> dict:
    meta = {"best": dataclasses.asdict(self.best), "elapsed_s": self._elapsed(),
            "selections": {r: dataclasses.asdict(b) for r, b in self.bests.items()},
            "history": self.history, **extra}
    if self.train_list is not None:
      meta["train_list"] = self.train_list
    if record is not None:
      meta.update(dataclasses.asdict(record))
    if self._train_pixels is not None:
      meta["train_pixels"] = self._train_pixels
    return checkpoints.run_meta(self.config, step, meta)

  # ----------------------------------------------------------------------------------- end

  def finish(self, state: Any, source_only: dict | None = None) -> dict:
    """Closes the writers and checkpoints; writes results.json; logs and prints the final
    accuracy and mean class accuracy of each list, the target first and the source test set as
    forgetting (after adaptation), beside the source-only ones when given ({name:
    {'accuracy', 'mean_class_accuracy'}}). Returns {'final', 'best', 'results'}."""
    self.writer.flush()
    self.ckpt.close()
    self.lock.release()
    if not self.results:   # resumed after the last step: evaluate once for the summary
      self.results = self.evaluator.evaluate(
          _variables(state), self._evals, label_free=("target",) if len(self.rules) > 1 else ())
    final = {name: r["accuracy"] for name, r in self.results.items()}
    select_by, note = self.config.data.select_by, self.selection_note
    best = (f"best {select_by} {self.best.value * 100:.2f}% at step {self.best.step}"
            + (f" ({note})" if note else ""))
    pairs = None if source_only is None else dict(source_only)
    last_step = int(jax.device_get(state.step))
    selections = {r: {"step": b.step, "value": b.value, "folder": best_folder(r, self.main_rule),
                      "uses_target_labels": r == "oracle", "lists": b.lists}
                  for r, b in ((r, self.best if r == self.main_rule else self.bests[r])
                               for r in self.rules)}
    selections["last"] = {"step": last_step, "value": None, "folder": "checkpoints",
                          "uses_target_labels": False,
                          "lists": {k: records.scores(r) for k, r in self.results.items()}}
    document = records.results(
        self.config, self.workdir, selection=f"best {select_by} accuracy"
        + (f" ({note})" if note else ""), best_step=self.best.step,
        last_step=last_step, best=self.best.lists or None,
        last=self.results, source_only=pairs, wall_time_s=self._elapsed(), mesh=self.mesh,
        selections=selections, history=self.history)
    path = records.write_results(self.workdir, document)
    summary = "; ".join(self._summary_part(name, entry, pairs is not None)
                        for name, entry in document["lists"].items())
    # On the terminal as the printed line below (stdout, which scripts read).
    logging.info("final (step %d): %s; %s", self.config.num_steps, summary, best)
    logging.info("results written to %s", path)
    print(f"[{self.stage}] final: {summary}; {best}", flush=True)
    return {"final": final, "best": dataclasses.asdict(self.best), "results": self.results}

  def _summary_part(self, name: str, entry: dict, side_by_side: bool) -> str:
    role = entry["role"]
    if role == "source_test":
      label = "forgetting (source test)" if self.stage == "adapt" else "source test"
    else:
      label = name
    pct = lambda pair: (f"{pair['accuracy'] * 100:.2f}% (mean class "
                        f"{pair['mean_class_accuracy'] * 100:.2f}%)")
    if not side_by_side:
      return f"{label} accuracy {pct(entry['last'])}"
    before = entry["source_only"] or {"accuracy": float("nan"),
                                      "mean_class_accuracy": float("nan")}
    return f"{label}: source-only {pct(before)} -> adapted {pct(entry['last'])}"

  def _elapsed(self) -> float:
    """Wall time of the run so far, summed over its resumes (up to the last checkpoint's
    save for the attempts that were killed)."""
    return self._elapsed_before + time.time() - self._started


  # ------------------------------------------------------------------------------ preemption

  def _install_signal_handlers(self) -> None:
    if threading.current_thread() is not threading.main_thread():
      return   # signals reach the main thread only (e.g. a run inside a test thread)

    def request_stop(signum, frame):
      del frame
      if self._stop_signal:          # a second signal: stop now
        raise KeyboardInterrupt
      self._stop_signal = signum
      logging.warning("received %s: finishing the step, then a checkpoint and exit %d",
                      signal.Signals(signum).name, constants.EXIT_PREEMPTED)
    for sig in (signal.SIGTERM, signal.SIGINT):
      signal.signal(sig, request_stop)

  def _stop_requested(self, logged: bool) -> bool:
    if jax.process_count() == 1:
      return bool(self._stop_signal)
    # All processes must stop at the same step (the checkpoint is collective); agreeing costs a
    # host sync, so they compare their flags at the logging steps only.
    if not logged:
      return False
    flags = multihost_utils.process_allgather(np.int32(self._stop_signal))
    return bool(np.max(flags))

  def _stop(self, step: int) -> None:
    logging.warning("preempted: checkpoint written at step %d; rerun the same command to resume",
                    step)
    self.writer.flush()
    self.ckpt.close()
    self.lock.release()
    raise Preempted(self._stop_signal or signal.SIGTERM, step)


def describe_rule(rule: str) -> str:
  """A rule's name in logs and results: the oracle says that it uses target labels."""
  if rule == "oracle":
    return "target accuracy (oracle: uses target labels)"
  if rule in selection.LABEL_FREE:
    return f"{rule} (label-free)"
  return f"{rule} accuracy"


def _variables(state) -> dict:
  return {"params": state.params, "batch_stats": state.batch_stats}
