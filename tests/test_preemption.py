"""Real processes killed at chosen points: every rerun ends bit-identical to an uninterrupted run.

SIGKILL after a best/ save and before the next latest checkpoint (best/ ahead of checkpoints/;
TensorBoard shows each step once after the rerun), and at a random moment while checkpoints are
written every step;
SIGTERM to the whole process group mid-run with two data workers, as a scheduler preempts (a
checkpoint at the current step, exit 75, no worker left, the lock released) while a second run on
the same workdir is refused; a NaN run (a named error, exit 1, the fatal line last, no non-finite
checkpoint)."""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import psutil
import pytest

from configs import demo_source
from eercl_jax import checkpoints, constants, run as run_lib
from eercl_jax.models import eercl
from tests.conftest import REPO

pytestmark = pytest.mark.slow   # an end-to-end run: not in the fast tier

STEPS = 30
FLAGS = [f"--config.num_steps={STEPS}", "--config.log_every=1",
         "--config.eval_every=1", f"--config.checkpoint_every={STEPS}"]


def _args(workdir, *extra):
  return [sys.executable, "-m", "eercl_jax.main", f"--config={REPO}/configs/demo_source.py:runlocal",
          f"--workdir={workdir}", *FLAGS, *extra]


def _env():
  return dict(os.environ, PYTHONPATH=REPO)


def _run(workdir, data_dir, *extra):
  return subprocess.run(_args(workdir, *extra), cwd=data_dir, env=_env(), capture_output=True,
                        text=True, timeout=600)


def _start(workdir, data_dir, *extra):
  """The run in a process group of its own (as a job step: a signal can go to all of it)."""
  return subprocess.Popen(_args(workdir, *extra), cwd=data_dir, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True)


def _wait_for(log, text, proc, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if log.exists() and text in log.read_text():
      return
    time.sleep(0.05)
  raise AssertionError(f"{text!r} never appeared in {log} (rc {proc.poll()})")


def _params(folder):
  model = eercl.create_model(demo_source.get_config("runlocal").model)
  variables, _ = checkpoints.restore_variables(
      str(folder), model, 32, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  return jax.device_get(variables)


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("whole")
  proc = _run(workdir, data_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return _params(workdir / "checkpoints"), proc.stdout


def _same(a, b):
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def _logged_steps(workdir, tag="train/loss"):
  """The steps of `tag` TensorBoard shows (its reader of tensor summaries, which discards what
  a session wrote past a later session's start)."""
  # pylint: disable=import-outside-toplevel
  from tensorboard.backend.event_processing import plugin_event_accumulator
  acc = plugin_event_accumulator.EventAccumulator(str(workdir / "tensorboard"),
                                                  size_guidance={"tensors": 0})
  acc.Reload()
  return [e.step for e in acc.Tensors(tag)]


def test_sigkill_between_a_best_save_and_the_next_checkpoint(data_dir, tmp_path, uninterrupted):
  workdir = tmp_path / "killed"
  proc = _start(workdir, data_dir)
  _wait_for(workdir / "logs" / "train.log", "step 2 selection:", proc)
  proc.kill()
  proc.wait()
  assert os.listdir(workdir / "best") and not os.listdir(workdir / "checkpoints")
  rerun = _run(workdir, data_dir)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  _same(_params(workdir / "checkpoints"), uninterrupted[0])
  assert rerun.stdout.splitlines()[-1] == uninterrupted[1].splitlines()[-1]
  # The killed run logged steps 1, 2, ... and the rerun logged them again from step 1.
  assert _logged_steps(workdir) == list(range(1, STEPS + 1))


def test_sigkill_at_a_random_point_of_the_saves(data_dir, tmp_path, uninterrupted):
  """A checkpoint every step, killed at a random moment: a half-written checkpoint is never
  used, and the rerun ends as the uninterrupted run."""
  workdir = tmp_path / "random"
  proc = _start(workdir, data_dir, "--config.checkpoint_every=1")
  _wait_for(workdir / "logs" / "train.log", "step 2/", proc)
  time.sleep(np.random.default_rng().uniform(0.0, 1.5))
  proc.kill()
  proc.wait()
  rerun = _run(workdir, data_dir)   # checkpoint_every back to the default: not a fixed field
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  _same(_params(workdir / "checkpoints"), uninterrupted[0])


def test_sigterm_to_the_process_group_checkpoints_stops_workers_and_resumes_exactly(
    data_dir, tmp_path, uninterrupted):
  """A scheduler's preemption (slurm's --signal=TERM without B:, scancel, Ctrl-C) signals every
  process of the job, the data workers too: they must outlive it until the run has written its
  checkpoint, and then go."""
  workdir = tmp_path / "term"
  proc = _start(workdir, data_dir, "--config.data.num_workers=2")
  log = workdir / "logs" / "train.log"
  _wait_for(log, "step 3/", proc)
  workers = psutil.Process(proc.pid).children(recursive=True)
  assert workers, "no data worker processes"
  # A second run on the same workdir is refused while the first holds it.
  second = _run(workdir, data_dir)
  assert second.returncode != 0 and f"pid {proc.pid}" in second.stderr
  os.killpg(proc.pid, signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == constants.EXIT_PREEMPTED, err[-3000:]
  steps = [int(s) for s in os.listdir(workdir / "checkpoints")]
  assert len(steps) == 1 and 3 <= steps[0] < STEPS
  assert "preempted: checkpoint written at step" in log.read_text()
  assert not (workdir / "run.lock").exists()
  _, alive = psutil.wait_procs(workers, timeout=10)
  assert not alive, f"data workers outlived their parent: {alive}"
  rerun = _run(workdir, data_dir)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"at step {steps[0]} (source stage)" in log.read_text()
  _same(_params(workdir / "checkpoints"), uninterrupted[0])


def test_nan_stops_with_a_named_error_and_saves_nothing_non_finite(data_dir, tmp_path):
  workdir = tmp_path / "nan"
  proc = _run(workdir, data_dir, "--config.optim.lr=1e12", "--config.checkpoint_every=1",
              "--config.eval_every=1000")
  assert proc.returncode == 1
  last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
  assert last.startswith("FATAL FloatingPointError: non-finite values in the training state "
                         "at step"), last
  log_lines = (workdir / "logs" / "train.log").read_text().splitlines()
  assert "FATAL FloatingPointError" in log_lines[-1]
  if os.listdir(workdir / "checkpoints"):   # whatever was saved before the NaN is finite
    assert not run_lib.non_finite_paths(_params(workdir / "checkpoints"))
