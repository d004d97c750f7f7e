"""The run skeleton both stages share: everything around the training step that is I/O.

A stage's loop reads

    run = Run(config, workdir, "source")            # log file, writer, mesh, config check
    train_list, evals = lists.read_run_lists(config.data)
    ...build model, optimiser, initial state...
    run.set_evaluation(model, evals)
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
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
from absl import logging

from eercl_jax import checkpoints, config_defaults, evaluation, logs, optim, parallel
from eercl_jax.models import registry


def itstime(step: int, every: int, total: int | None = None) -> bool:
  """Is a periodic action due after `step`? At every multiple of `every`, and at the last step
  `total` when given."""
  return (every > 0 and step % every == 0) or (total is not None and step == total)


@dataclasses.dataclass
class Best:
  """The best evaluation so far by `config.data.select_by` (value -1: none yet)."""
  value: float = -1.0
  step: int = -1


class Run:
  """One run's I/O: start-up, resume, periodic logging / evaluation / checkpoints, summary.

  stage:          'source' or 'adapt' (log and summary labels).
  log_keys:       (metric, label, format) of the training scalars on the log line.
  ratios:         {scalar: (numerator, denominator)}: scalars logged as a ratio of two summed
                  `count/...` metrics over the logging window (NaN when the denominator is 0),
                  rather than a mean of per-step ratios.
  selection_note: appended where the best checkpoint's selection is reported (the adaptation's
                  selection by target accuracy uses target labels: an oracle).
  """

  def __init__(self, config, workdir: str, stage: str,
               log_keys: Sequence[tuple[str, str, str]] = (("train/loss", "loss", ".4f"),),
               ratios: Mapping[str, tuple[str, str]] | None = None, selection_note: str = ""):
    self.config, self.workdir, self.stage = config, workdir, stage
    self.log_keys, self.selection_note = tuple(log_keys), selection_note
    self.ratios = dict(ratios or {})
    logs.setup_file_log(workdir)
    self.writer = logs.create_writer(workdir)
    self.mesh = parallel.create_mesh()
    config_defaults.validate(config, self.mesh.devices.size, jax.process_count())
    self.ckpt = checkpoints.RunCheckpoints(workdir, keep=config.keep_checkpoints)
    self.best = Best()
    self.start_step = 0
    self.results: dict[str, dict] = {}
    self._running = logs.MeanMetrics()
    self._progress = logs.Progress(0, config.num_steps)
    self._schedule = optim.make_schedule(config.optim)
    self._backbone_mult = registry.lr_mult(config.model, config.optim)["backbone"]
    self._predict = self._evals = None

  # -------------------------------------------------------------------------------- start-up

  def set_evaluation(self, model, evals: dict) -> None:
    """The model whose eval-mode predictions are scored on `evals` ({name: FerList})."""
    self._predict = evaluation.make_predict(model, self.config.data)
    self._evals = evals

  def resume(self, state: Any, record: Any = None) -> tuple[Any, Any, Any]:
    """(state, record, iterator state) of the workdir's latest checkpoint; the given initial
    state and record (and None) when there is none. The checkpoint's model must match the
    config."""
    restored = self.ckpt.restore_latest(checkpoints.abstract_like(state))
    iterator_state = None
    if restored is not None:
      state, data, meta = restored
      checkpoints.check_model_meta(meta, self.config, self.ckpt.latest.directory)
      self.best = Best(**meta.get("best", {}))
      if record is not None:
        fields = {f.name for f in dataclasses.fields(record)}
        record = dataclasses.replace(record, **{k: v for k, v in meta.items() if k in fields})
      if data.get("iterator") is not None:
        iterator_state = checkpoints.decode_data_state(data["iterator"])
      logging.info("resumed from %s at step %d (%s stage)", self.ckpt.latest.directory,
                   int(state.step), self.stage)
    self.start_step = int(state.step)
    self._progress = logs.Progress(self.start_step, self.config.num_steps)
    return state, record, iterator_state

  def steps(self) -> range:
    """The steps still to do, 1-based (see the module docstring)."""
    return range(self.start_step + 1, self.config.num_steps + 1)

  # -------------------------------------------------------------------------- periodic work

  def end_of_step(self, step: int, state: Any, metrics: dict, iterator: Any,
                  record: Any = None) -> None:
    """After step `step`: accumulate its metrics; log, evaluate (+ best checkpoint) and
    checkpoint when each is due."""
    c = self.config
    self._running.add(metrics)
    if itstime(step, c.log_every, c.num_steps):
      self.log_training(step)
    if itstime(step, c.eval_every, c.num_steps):
      self.evaluate_and_select(step, state, record)
    if itstime(step, c.checkpoint_every, c.num_steps):
      self.save(step, state, iterator, record)

  def log_training(self, step: int) -> dict[str, float]:
    """Means over the steps since the last log, plus the `ratios` of summed counts."""
    means, sums = self._running.pop()
    scalars = {k: v for k, v in means.items() if not k.startswith("count/")}
    for name, (num, den) in self.ratios.items():
      scalars[name] = sums[num] / sums[den] if sums[den] > 0 else float("nan")
    rate, eta = self._progress.tick(step)
    scalars["train/steps_per_sec"] = rate
    # The learning rate of the step just taken (its schedule index is step - 1).
    scalars["train/lr"] = float(self._schedule(step - 1)) * self._backbone_mult
    self.writer.write_scalars(step, scalars)
    shown = " ".join(f"{label}={scalars[key]:{fmt}}" for key, label, fmt in self.log_keys
                     if key in scalars)
    logging.info("step %d/%d %s lr=%.2e %.2f steps/s ETA %s", step, self.config.num_steps,
                 shown, scalars["train/lr"], rate, eta)
    return scalars

  def evaluate(self, step: int, variables: dict, save_confusions: bool = True) -> dict:
    """Scores `variables` on every evaluation list; writes the scalars (and confusions)."""
    results = evaluation.evaluate_lists(self._predict, variables, self._evals, self.config,
                                        self.mesh)
    self.writer.write_scalars(step, evaluation.scalars(results))
    if save_confusions:
      evaluation.save_confusions(self.workdir, step, results)
    return results

  def evaluate_and_select(self, step: int, state: Any, record: Any = None) -> dict:
    select_by = self.config.data.select_by
    self.results = self.evaluate(step, _variables(state))
    value = self.results[select_by]["accuracy"]
    if value >= self.best.value:   # ties -> the later checkpoint, as the original
      self.best = Best(value, step)
      self.ckpt.save(step, state, {"iterator": None},
                     self._meta(step, record, selected_by=select_by,
                                selection=self.selection_note or select_by), best=True)
    logging.info("step %d: %s accuracy %.4f; best %.4f at step %d%s", step, select_by, value,
                 self.best.value, self.best.step,
                 f" ({self.selection_note})" if self.selection_note else "")
    return self.results

  def save(self, step: int, state: Any, iterator: Any, record: Any = None) -> None:
    """A resumable checkpoint: state, the iterator's position, the record."""
    data = {"iterator": checkpoints.encode_data_state(iterator.get_state())}
    self.ckpt.save(step, state, data, self._meta(step, record))

  def _meta(self, step: int, record: Any, **extra) -> dict:
    meta = {"best": dataclasses.asdict(self.best), **extra}
    if record is not None:
      meta.update(dataclasses.asdict(record))
    return checkpoints.run_meta(self.config, step, meta)

  # ----------------------------------------------------------------------------------- end

  def finish(self, state: Any, source_only: dict[str, float] | None = None) -> dict:
    """Closes the writers and checkpoints; logs and prints the final accuracies (beside the
    source-only ones when given). Returns {'final', 'best', 'results'}."""
    self.writer.flush()
    self.ckpt.close()
    if not self.results:   # resumed after the last step: evaluate once for the summary
      self.results = evaluation.evaluate_lists(self._predict, _variables(state), self._evals,
                                               self.config, self.mesh)
    final = {name: r["accuracy"] for name, r in self.results.items()}
    select_by, note = self.config.data.select_by, self.selection_note
    best = (f"best {select_by} {self.best.value * 100:.2f}% at step {self.best.step}"
            + (f" ({note})" if note else ""))
    if source_only is None:
      summary = " | ".join(f"{k} accuracy {v * 100:.2f}%" for k, v in final.items())
    else:
      summary = "; ".join(f"{k}: source-only {source_only.get(k, float('nan')) * 100:.2f}% -> "
                          f"adapted {v * 100:.2f}%" for k, v in final.items())
    logging.info("final (step %d): %s; %s", self.config.num_steps, summary, best)
    print(f"[{self.stage}] final: {summary}; {best}", flush=True)
    return {"final": final, "best": dataclasses.asdict(self.best), "results": self.results}


def _variables(state) -> dict:
  return {"params": state.params, "batch_stats": state.batch_stats}
