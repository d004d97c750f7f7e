"""What a run leaves for a person: the TensorBoard event files (scalars readable with
`EventAccumulator.Scalars`), metrics.csv (a row per evaluation, over resumes without
duplicates), the quiet terminal beside the complete log file, and a CLI run's terminal output."""
import csv
import glob
import logging as py_logging
import os
import subprocess
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest
from absl import logging

from configs import demo_source
from eercl_jax import constants, evaluation, event_files, logs, run as run_lib
from tests.conftest import REPO
from tests.test_run import ToyIterator, ToyState


def _accumulator(logdir):
  # pylint: disable-next=import-outside-toplevel
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={"tensors": 0,
                                                                       "images": 0})
  acc.Reload()
  return acc


def test_event_writer_scalars_images_hparams(tmp_path):
  from clu import metric_writers  # pylint: disable=import-outside-toplevel
  writer = event_files.create_writer(str(tmp_path))
  assert isinstance(writer, metric_writers.MetricWriter)   # usable wherever clu's writers are
  with pytest.raises(NotImplementedError, match="texts"):
    writer.write_texts(1, {"note": "x"})
  writer.write_hparams({"num_steps": 4, "stage": "source"})
  writer.write_scalars(1, {"train/loss": 1.5, "eval/target_accuracy": np.float32(0.25)})
  writer.write_scalars(2, {"train/loss": jnp.asarray(1.25)})
  writer.write_images(2, {"views/train": np.full((1, 6, 10, 3), 200, np.uint8)})
  writer.flush()
  acc = _accumulator(tmp_path / "tensorboard")
  assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 1.5), (2, 1.25)]
  assert acc.Scalars("eval/target_accuracy")[0].value == 0.25
  image = acc.Images("views/train")[0]
  assert (image.step, image.width, image.height) == (2, 10, 6)
  assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")
  # A second writer of the same process writes its own file (TensorBoard reads both).
  event_files.create_writer(str(tmp_path)).write_scalars(3, {"train/loss": 1.0})
  assert len(glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))) == 2


def test_metrics_csv_header_once_missing_values_and_prune(tmp_path):
  table = logs.MetricsCsv(str(tmp_path / "m.csv"))
  assert table.prune(5) == 0 and table.rows() == []
  table.append({"step": 2, "a": 0.5, "b": float("nan")})
  table.append({"step": 4, "a": 0.25})
  table.append({"step": 6, "a": 0.125, "b": 1.0})
  with open(table.path) as f:
    lines = f.read().splitlines()
  assert lines == ["step,a,b", "2,0.5,", "4,0.25,", "6,0.125,1.0"]
  assert table.prune(4) == 1 and [r["step"] for r in table.rows()] == ["2", "4"]
  assert table.prune(4, keep_last=False) == 1 and [r["step"] for r in table.rows()] == ["2"]
  assert table.header() == ["step", "a", "b"]


class _FakeEvaluator:
  """The scores of a scripted confusion matrix per evaluation (the accuracy of the source list
  says which attempt and step computed it)."""

  def __init__(self, attempt):
    self.attempt = attempt

  def evaluate(self, variables, evals, label_free=(), show=False):
    del show
    step = int(np.asarray(variables["params"]["w"])[0])
    right = 10 * self.attempt + step            # out of 100
    out = {}
    for name in evals:
      cm = np.zeros((7, 7), int)
      cm[0, :2] = right, 100 - right
      out[name] = evaluation.summarize(cm)
      if name in label_free:
        out[name].update(im=0.5, snd=1.5)
    return out


def _run(workdir, attempt):
  c = demo_source.get_config("runlocal")
  c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = 8, 4, 2, 4
  r = run_lib.Run(c, workdir, "source")
  evals = {name: types.SimpleNamespace(list_path=path)
           for name, path in c.data.eval_lists.items()}
  r.set_evaluation(None, evals, _FakeEvaluator(attempt))
  return r


def _drive(r, state, stop_after=None):
  for step in r.steps():
    state = state.replace(step=jnp.asarray(step, jnp.int32), params={"w": jnp.full(3, step)})
    r.end_of_step(step, state, {"train/loss": jnp.asarray(1.0)}, ToyIterator(step))
    if step == stop_after:
      r.ckpt.close()
      r.lock.release()
      return state
  return state


def _rows(workdir):
  with open(os.path.join(workdir, constants.METRICS_FILE), newline="") as f:
    return list(csv.reader(f))


def test_metrics_csv_a_row_per_evaluation_and_a_resume_drops_the_killed_attempts_rows(
    tmp_path):
  workdir = str(tmp_path / "run")
  r = _run(workdir, attempt=1)
  state, _, _ = r.resume(ToyState(step=jnp.zeros((), jnp.int32), params={"w": jnp.zeros(3)},
                                  batch_stats={}))
  _drive(r, state, stop_after=6)   # evaluations at 2, 4, 6; the last checkpoint is step 4
  rows = _rows(workdir)
  assert rows[0] == ["step", "source_accuracy", "source_mean_class_accuracy", "source_macro_f1",
                     "target_accuracy", "target_mean_class_accuracy", "target_macro_f1",
                     "wall_time_s"]
  assert [row[0] for row in rows[1:]] == ["2", "4", "6"]
  assert float(rows[3][1]) == pytest.approx(0.16)       # attempt 1, step 6
  # The source list's macro F1 is the F1 of its one class with images: 2 p r / (p + r).
  assert float(rows[1][3]) == pytest.approx(2 * 0.12 / 1.12)

  r2 = _run(workdir, attempt=2)
  state, _, _ = r2.resume(ToyState(step=jnp.zeros((), jnp.int32), params={"w": jnp.zeros(3)},
                                   batch_stats={}))
  assert r2.start_step == 4
  _drive(r2, state)
  rows = _rows(workdir)
  assert sum(row[0] == "step" for row in rows) == 1      # one header
  assert [row[0] for row in rows[1:]] == ["2", "4", "6", "8"]
  # Steps 2, 4 from the first attempt; 6 recomputed by the second (its row replaced), 8 new.
  assert [float(row[1]) for row in rows[1:]] == pytest.approx([0.12, 0.14, 0.26, 0.28])
  walls = [float(row[-1]) for row in rows[1:]]
  assert all(w > 0 for w in walls) and walls == sorted(walls)

  # A run started over (no checkpoint) in a workdir with rows recomputes them all.
  other = str(tmp_path / "fresh")
  os.makedirs(other)
  with open(os.path.join(other, constants.METRICS_FILE), "w") as f:
    f.write("step,source_accuracy\n2,0.9\n")
  r3 = _run(other, attempt=3)
  r3.resume(ToyState(step=jnp.zeros((), jnp.int32), params={"w": jnp.zeros(3)}, batch_stats={}))
  r3.evaluate(2, {"params": {"w": jnp.full(3, 2)}, "batch_stats": {}})
  r3.ckpt.close()
  r3.lock.release()
  assert [row[:2] for row in _rows(other)] == [["step", "source_accuracy"], ["2", "0.32"]]


def test_run_scalars_are_readable_with_event_accumulator(tmp_path):
  workdir = str(tmp_path / "run")
  r = _run(workdir, attempt=1)
  state, _, _ = r.resume(ToyState(step=jnp.zeros((), jnp.int32), params={"w": jnp.zeros(3)},
                                  batch_stats={}))
  _drive(r, state, stop_after=4)
  acc = _accumulator(os.path.join(workdir, "tensorboard"))
  assert [e.step for e in acc.Scalars("train/loss")] == [4]
  assert [(e.step, round(e.value, 4)) for e in acc.Scalars("eval/target_accuracy")] == \
      [(2, 0.12), (4, 0.14)]
  assert {"eval/target_macro_f1", "eval/source/class_acc/angry"} <= set(acc.Tags()["scalars"])
  assert {"confusion/target", "confusion/source"} <= set(acc.Tags()["images"])


@pytest.fixture
def clean_logging():
  """Restores the root logger, absl's handler filters and the verbosity after a test."""
  root = py_logging.getLogger()
  handlers, level = list(root.handlers), root.level
  absl_handler = logging.get_absl_handler()
  filters = list(absl_handler.filters)
  verbosity = logging.get_verbosity()
  yield
  for h in list(root.handlers):
    if h not in handlers:
      root.removeHandler(h)
      h.close()
  root.setLevel(level)
  absl_handler.filters[:] = filters
  logging.set_verbosity(verbosity)


def test_terminal_shows_marked_lines_and_warnings_the_file_everything(tmp_path, clean_logging):
  del clean_logging
  root = py_logging.getLogger()
  root.setLevel(py_logging.INFO)
  logs.quiet_terminal()
  library = py_logging.getLogger("some.library")
  library.info("early library line")                 # before the log file exists: kept
  path = logs.setup_file_log(str(tmp_path))
  logging.info("config dump")
  logging.info("step 5/10 loss=1.0", extra=logs.SHOW)
  logging.warning("a warning")
  library.info("library line")
  def shown(msg, level=py_logging.INFO, **extra):   # would absl's stderr handler write it?
    record = py_logging.LogRecord("absl", level, __file__, 1, msg, (), None)
    record.__dict__.update(extra)
    return bool(logging.get_absl_handler().filter(record))
  assert shown("step 5/10", **logs.SHOW) and shown("a warning", py_logging.WARNING)
  assert not shown("config dump") and not shown("orbax saving")
  logs.quiet_terminal()       # idempotent
  assert not shown("config dump")
  with open(path) as f:
    text = f.read()
  assert path == os.path.join(str(tmp_path), "logs", "train.log")
  for line in ("early library line", "config dump", "step 5/10 loss=1.0", "a warning",
               "library line"):
    assert line in text
  assert text.index("early library line") < text.index("config dump")
  assert "test_logs.py:" in text          # each line names its source file


@pytest.mark.slow
def test_cli_terminal_is_short_and_the_log_complete(data_dir, tmp_path):
  """A runlocal source run through the CLI: the terminal holds the progress, evaluation and
  selection lines and the final line, and little else; train.log holds the config dump and the
  checkpoint library's lines too."""
  workdir = tmp_path / "run"
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.run(
      [sys.executable, "-m", "eercl_jax.main", f"--config={REPO}/configs/demo_source.py:runlocal",
       f"--workdir={workdir}", "--config.num_steps=4", "--config.log_every=2",
       "--config.eval_every=4", "--config.checkpoint_every=4"],
      cwd=data_dir, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  terminal = (proc.stdout + proc.stderr).splitlines()
  # 2 progress lines, 2 evaluation lines, 1 selection line, the final line (and room for a
  # warning or two of the libraries).
  assert len(terminal) <= 10, "\n".join(terminal)
  assert proc.stdout.splitlines()[-1].startswith("[source] final: target accuracy ")
  assert sum("step 2/4 " in line for line in terminal) == 1
  assert sum("source: acc=" in line for line in terminal) == 1
  assert not any("config (recorded in" in line or "orbax" in line for line in terminal)
  log = open(workdir / "logs" / "train.log").read()
  assert "config (recorded in" in log and "num_steps: 4" in log
  # orbax's own lines (its file names: checkpoint_manager.py, async_checkpointer.py, ...).
  assert any("checkpoint" in line.split("] ")[0] for line in log.splitlines() if "] " in line)
  assert "results written to" in log and "final (step 4)" in log
  rows = list(csv.DictReader(open(workdir / constants.METRICS_FILE)))
  assert [r["step"] for r in rows] == ["4"]


@pytest.mark.slow
def test_pack_prints_only_the_output_path(data_dir, tmp_path):
  """tfds's progress bars and its 'downloaded and prepared' lines stay off the terminal; the
  command prints the packed set's path (scripts read it)."""
  out = tmp_path / "packed"
  proc = subprocess.run(
      [sys.executable, "-m", "eercl_jax.data.pack",
       "--list=data/txt/fer/unlabeled_target_images_synth_studio_0.txt", "--image_root=data/fer",
       f"--out={out}"],
      cwd=data_dir, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.splitlines() == [str(out)]
  assert proc.stderr == ""
  assert os.path.isfile(out / "eercl_pack.json")
