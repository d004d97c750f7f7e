"""The run skeleton on its own: the `itstime` predicate, best-checkpoint selection (ties go to the
later step), and resuming the typed record, the best and the iterator state - with a toy state
and scripted accuracies, no model."""
import dataclasses
import os
from typing import Any, Optional

import flax
import jax.numpy as jnp
import pytest

from configs import demo_source
from eercl_jax import checkpoints, constants, run as run_lib



def test_itstime():
  due = [s for s in range(1, 11) if run_lib.itstime(s, 4, 10)]
  assert due == [4, 8, 10]                        # multiples, and the last step
  assert [s for s in range(1, 11) if run_lib.itstime(s, 4)] == [4, 8]
  assert [s for s in range(1, 4) if run_lib.itstime(s, 0, 3)] == [3]   # every=0: only the end


@flax.struct.dataclass
class ToyState:
  step: Any
  params: Any
  batch_stats: Any


@dataclasses.dataclass
class ToyRecord:
  stream: int = 0
  note: Optional[dict] = None


class ToyIterator:
  def __init__(self, position=0):
    self.position = position

  def get_state(self):
    return {"position": self.position, "blob": b"\x00\x01"}


def _run(workdir, accuracies, monkeypatch):
  c = demo_source.get_config("runlocal")
  c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = 6, 3, 1, 2
  r = run_lib.Run(c, workdir, "source")
  scripted = iter(accuracies)

  def fake_evaluate(step, variables, save_confusions=True):
    del variables, save_confusions
    acc = next(scripted)
    return {"source": {"accuracy": acc, "mean_class_accuracy": acc},
            "target": {"accuracy": acc / 2, "mean_class_accuracy": acc / 2}}
  monkeypatch.setattr(r, "evaluate", fake_evaluate)
  return r


def test_best_selection_ties_go_to_the_later_step_and_resume_restores_it(tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  r = _run(workdir, [0.5, 0.7, 0.6, 0.7, 0.2, 0.1], monkeypatch)
  state = ToyState(step=jnp.zeros((), jnp.int32), params={"w": jnp.zeros(3)}, batch_stats={})
  state, record, it_state = r.resume(state, ToyRecord())
  assert (record, it_state, r.start_step) == (ToyRecord(), None, 0)
  for step in r.steps():
    state = state.replace(step=jnp.asarray(step, jnp.int32), params={"w": jnp.full(3, step)})
    record.stream = 10 * step
    r.end_of_step(step, state, {"train/loss": jnp.asarray(1.0)}, ToyIterator(step), record)
    if step == 4:
      break       # "killed" after step 4: checkpoints at 2 and 4 exist
  assert (r.best.value, r.best.step) == (0.7, 4)   # 0.7 at step 2, tied at step 4: the later wins
  assert r.best.lists["target"] == {"accuracy": 0.35, "mean_class_accuracy": 0.35}   # for results.json
  best_step, meta = checkpoints.read_meta(os.path.join(workdir, "best"))
  assert best_step == 4 and (meta["best"]["value"], meta["best"]["step"]) == (0.7, 4)
  assert meta["stream"] == 40 and meta["arch"]["size"] == "mu/8"
  r.ckpt.close()

  # Resuming restores the state, the typed record, the best so far and the iterator position.
  r2 = _run(workdir, [0.7, 0.9], monkeypatch)
  fresh = ToyState(step=jnp.zeros((), jnp.int32), params={"w": jnp.zeros(3)}, batch_stats={})
  state, record, it_state = r2.resume(fresh, ToyRecord())
  assert int(state.step) == 4 and list(state.params["w"]) == [4, 4, 4]
  assert record == ToyRecord(stream=40) and it_state == {"position": 4, "blob": b"\x00\x01"}
  assert r2.best == r.best and list(r2.steps()) == [5, 6]   # the lists' accuracies too
  for step in r2.steps():
    state = state.replace(step=jnp.asarray(step, jnp.int32))
    r2.end_of_step(step, state, {"train/loss": jnp.asarray(1.0)}, ToyIterator(step), record)
  assert (r2.best.value, r2.best.step) == (0.9, 6)   # 0.7 at step 5 ties the resumed best
  out = r2.finish(state)
  assert (out["best"]["value"], out["best"]["step"]) == (0.9, 6)
  assert out["final"]["source"] == 0.9
  assert sorted(os.listdir(os.path.join(workdir, "best"))) == ["6"]


def test_resume_refuses_another_architecture(tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  r = _run(workdir, [0.5] * 6, monkeypatch)
  state = ToyState(step=jnp.zeros((), jnp.int32), params={"w": jnp.zeros(3)}, batch_stats={})
  state, _, _ = r.resume(state)
  r.save(2, state.replace(step=jnp.asarray(2)), ToyIterator(2))
  r.ckpt.close()
  c = demo_source.get_config("runlocal")
  c.model.size = "Ti/8"
  other = run_lib.Run(c, workdir, "source")
  with pytest.raises(ValueError, match="model.size: checkpoint 'mu/8' vs config 'Ti/8'"):
    other.resume(state)


def _toy_state(step=0, value=0.0):
  return ToyState(step=jnp.asarray(step, jnp.int32), params={"w": jnp.full(3, value)},
                  batch_stats={})


def _drive(r, state, record, stop_after=None):
  for step in r.steps():
    state = state.replace(step=jnp.asarray(step, jnp.int32), params={"w": jnp.full(3, step)})
    record.stream = step
    r.end_of_step(step, state, {"train/loss": jnp.asarray(1.0)}, ToyIterator(step), record)
    if step == stop_after:
      r.ckpt.close()
      return None
  return r.finish(state)


def test_a_kill_between_a_best_save_and_the_next_checkpoint_does_not_block_the_rerun(
    tmp_path, monkeypatch):
  accs = [0.1, 0.5, 0.9, 0.9, 0.2, 0.3]
  whole = _run(str(tmp_path / "whole"), accs, monkeypatch)
  state, record, _ = whole.resume(_toy_state(), ToyRecord())
  want = _drive(whole, state, record)

  # Killed after step 3: best/3 saved, the latest checkpoint is still step 2.
  workdir = str(tmp_path / "killed")
  r = _run(workdir, accs, monkeypatch)
  state, record, _ = r.resume(_toy_state(), ToyRecord())
  _drive(r, state, record, stop_after=3)
  assert sorted(os.listdir(os.path.join(workdir, "best"))) == ["3"]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
  r2 = _run(workdir, accs[2:], monkeypatch)   # resumes at step 2: evaluations 3..6
  state, record, _ = r2.resume(_toy_state(), ToyRecord())
  got = _drive(r2, state, record)            # saving best/3 again must not fail
  assert got["best"] == want["best"] and (got["best"]["value"], got["best"]["step"]) == (0.9, 4)
  assert got["final"] == want["final"]
  assert sorted(os.listdir(os.path.join(workdir, "best"))) == ["4"]


def test_non_finite_state_stops_the_run_and_is_never_saved(tmp_path, monkeypatch):
  workdir = str(tmp_path / "nan")
  r = _run(workdir, [0.5] * 6, monkeypatch)
  state, record, _ = r.resume(_toy_state(), ToyRecord())
  for step in r.steps():
    w = jnp.full(3, float(step)).at[1].set(jnp.nan if step == 3 else 0.0)
    state = state.replace(step=jnp.asarray(step, jnp.int32), params={"w": w})
    if step < 3:
      r.end_of_step(step, state, {"train/loss": jnp.asarray(1.0)}, ToyIterator(step), record)
      continue
    with pytest.raises(FloatingPointError, match=r"at step 3 .*\['w'\]"):
      r.end_of_step(step, state, {"train/loss": jnp.asarray(jnp.nan)}, ToyIterator(step), record)
    break
  r.ckpt.close()
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
  assert sorted(os.listdir(os.path.join(workdir, "best"))) == ["2"]
  assert run_lib.non_finite_paths({"a": jnp.ones(2), "b": jnp.array([1.0, jnp.inf]),
                                   "i": jnp.arange(2)}) == ["['b']"]


def test_workdir_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, monkeypatch):
  import json  # pylint: disable=import-outside-toplevel
  import socket  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  workdir = tmp_path / "locked"
  workdir.mkdir()
  lock = workdir / "run.lock"
  live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": live.pid}))
    with pytest.raises(RuntimeError, match=f"in use by another run .*pid {live.pid}"):
      _run(str(workdir), [0.5], monkeypatch)
    assert json.loads(lock.read_text())["pid"] == live.pid     # the holder keeps its lock
  finally:
    live.kill()
    live.wait()
  # The holder is gone: its lock is stale and the next run takes it over, then releases it.
  r = _run(str(workdir), [0.5] * 6, monkeypatch)
  assert json.loads(lock.read_text())["pid"] == os.getpid()
  state, record, _ = r.resume(_toy_state(), ToyRecord())
  _drive(r, state, record)
  assert not lock.exists()


def test_sigterm_finishes_the_step_checkpoints_and_exits_with_the_preempted_code(
    tmp_path, monkeypatch):
  import signal  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path / "term")
  r = _run(workdir, [0.5] * 6, monkeypatch)
  state, record, _ = r.resume(_toy_state(), ToyRecord())
  with pytest.raises(run_lib.Preempted) as exc:
    for step in r.steps():
      state = state.replace(step=jnp.asarray(step, jnp.int32), params={"w": jnp.full(3, step)})
      if step == 3:
        os.kill(os.getpid(), signal.SIGTERM)   # arrives mid-step: the step still completes
      r.end_of_step(step, state, {"train/loss": jnp.asarray(1.0)}, ToyIterator(step), record)
  assert exc.value.code == constants.EXIT_PREEMPTED and exc.value.step == 3
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "3"]
  assert not os.path.exists(os.path.join(workdir, "run.lock"))
  r2 = _run(workdir, [0.5] * 3, monkeypatch)
  _, _, it_state = r2.resume(_toy_state(), ToyRecord())
  assert r2.start_step == 3 and it_state["position"] == 3
  r2.ckpt.close()
  r2.lock.release()


def test_resume_refuses_fields_that_change_shapes_or_the_stream(tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  r = _run(workdir, [0.5] * 6, monkeypatch)
  state, record, _ = r.resume(_toy_state(), ToyRecord())
  _drive(r, state, record, stop_after=4)           # checkpoints at 2 and 4

  def resume_with(**changes):
    c = demo_source.get_config("runlocal")
    c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = 6, 3, 1, 2
    for key, value in changes.items():
      node, leaf = c, key
      while "__" in leaf:
        head, leaf = leaf.split("__", 1)
        node = node[head]
      node[leaf] = value
    other = run_lib.Run(c, workdir, "source")
    try:
      return other.resume(_toy_state(), ToyRecord())
    finally:
      other.ckpt.close()

  with pytest.raises(ValueError, match=r"(?s)batch_size: 32 -> 64.*data\.crop: 32 -> 16"):
    resume_with(batch_size=64, data__crop=16)
  with pytest.raises(ValueError, match=r"model\.feat_dim: checkpoint 16 vs config 8"):
    resume_with(model__feat_dim=8)
  with pytest.raises(ValueError, match="num_steps=3 is below the step 4"):
    resume_with(num_steps=3)
  state, _, _ = resume_with(log_every=1, num_steps=10, data__num_workers=2)   # harmless
  assert int(state.step) == 4


def test_resuming_exactly_at_the_best_step_keeps_best(tmp_path, monkeypatch):
  """The latest checkpoint is also the best (step 2): the rerun resumes at it, must neither drop
  nor rewrite best/2 (`drop_best_after` drops only steps past the resumed one), and later
  evaluations below the best leave best/ alone; the run ends as an uninterrupted one."""
  accs = [0.1, 0.8, 0.3, 0.5, 0.4, 0.2]
  whole = _run(str(tmp_path / "whole"), accs, monkeypatch)
  state, record, _ = whole.resume(_toy_state(), ToyRecord())
  want = _drive(whole, state, record)
  assert (want["best"]["value"], want["best"]["step"]) == (0.8, 2)

  workdir = str(tmp_path / "killed")
  best_dir = os.path.join(workdir, "best")
  r = _run(workdir, accs, monkeypatch)
  state, record, _ = r.resume(_toy_state(), ToyRecord())
  _drive(r, state, record, stop_after=3)     # killed after step 3: checkpoints/2 = best/2
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
  assert sorted(os.listdir(best_dir)) == ["2"]
  saved = os.stat(os.path.join(best_dir, "2"))

  r2 = _run(workdir, accs[2:], monkeypatch)   # resumes at step 2: evaluations 3..6
  state, record, _ = r2.resume(_toy_state(), ToyRecord())
  assert r2.start_step == 2 and (r2.best.value, r2.best.step) == (0.8, 2)
  assert sorted(os.listdir(best_dir)) == ["2"]          # kept at the boundary step
  got = _drive(r2, state, record)
  assert got["best"] == want["best"] and got["final"] == want["final"]
  assert sorted(os.listdir(best_dir)) == ["2"]
  again = os.stat(os.path.join(best_dir, "2"))
  assert (again.st_ino, again.st_mtime_ns) == (saved.st_ino, saved.st_mtime_ns)   # not rewritten
  best_step, meta = checkpoints.read_meta(best_dir)
  assert best_step == 2 and (meta["best"]["value"], meta["best"]["step"]) == (0.8, 2)
  assert meta["stream"] == 2
