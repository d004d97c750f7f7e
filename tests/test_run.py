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


class DyingIterator(ToyIterator):
  """A training iterator whose data workers were killed: reading fails, its position stays."""

  def __next__(self):
    raise RuntimeError("Worker process was terminated unexpectedly with exit code -15.")


def test_a_worker_killed_by_the_stop_signal_is_part_of_the_stop(tmp_path, monkeypatch):
  """A group SIGTERM that also kills a data worker still starting (before it ignores the
  signal): reading the next batch fails, and the run checkpoints its last finished step and
  exits 75 instead of failing; without a stop request the error stands."""
  import signal  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path / "term")
  r = _run(workdir, [0.5] * 6, monkeypatch)
  state, record, _ = r.resume(_toy_state(), ToyRecord())
  it = DyingIterator(0)
  with pytest.raises(RuntimeError, match="Worker process"):
    r.next_batch(it)                            # no stop requested: a real failure
  state = state.replace(step=jnp.asarray(1, jnp.int32), params={"w": jnp.full(3, 1)})
  it.position = 1
  r.end_of_step(1, state, {"train/loss": jnp.asarray(1.0)}, it, record)   # not checkpointed
  os.kill(os.getpid(), signal.SIGTERM)
  with pytest.raises(run_lib.Preempted) as exc:
    r.next_batch(it)
  assert exc.value.code == constants.EXIT_PREEMPTED and exc.value.step == 1
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1"]
  assert not os.path.exists(os.path.join(workdir, "run.lock"))
  r2 = _run(workdir, [0.5] * 3, monkeypatch)
  _, _, it_state = r2.resume(_toy_state(), ToyRecord())
  assert r2.start_step == 1 and it_state["position"] == 1
  r2.ckpt.close()
  r2.lock.release()


def test_an_evaluation_whose_workers_took_the_stop_signal_is_done_again(tmp_path, monkeypatch):
  """The group SIGTERM during an evaluation kills its workers while they start: the evaluation
  is done again (its fresh workers start after the signal), then checkpoint and exit 75, with
  that evaluation in the checkpoint's history as in an uninterrupted run."""
  import signal  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path / "term")
  r = _run(workdir, [0.5] * 6, monkeypatch)
  state, record, _ = r.resume(_toy_state(), ToyRecord())
  scripted = r.evaluate
  calls = []

  def evaluate(step, variables, save_confusions=True):
    calls.append(step)
    if len(calls) == 1:
      os.kill(os.getpid(), signal.SIGTERM)
      raise RuntimeError("Worker process was terminated unexpectedly with exit code -15.")
    return scripted(step, variables, save_confusions)
  monkeypatch.setattr(r, "evaluate", evaluate)
  state = state.replace(step=jnp.asarray(1, jnp.int32), params={"w": jnp.full(3, 1)})
  with pytest.raises(run_lib.Preempted) as exc:
    r.end_of_step(1, state, {"train/loss": jnp.asarray(1.0)}, ToyIterator(1), record)
  assert exc.value.step == 1 and calls == [1, 1]
  assert [h["step"] for h in r.history] == [1]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1"]


def _lock_holder(workdir):
  import json  # pylint: disable=import-outside-toplevel
  return json.loads((workdir / "run.lock").read_text())


@pytest.mark.parametrize("content", ["", "{\"host\": \"h", "[]", "{\"note\": 1}"])
def test_a_lock_naming_no_holder_is_taken_over_with_a_warning(tmp_path, monkeypatch, content,
                                                               caplog):
  """An empty or unreadable run.lock (a run that died between creating and writing it) is a dead
  holder: taken over, with a warning naming the file, not 'could not take the lock'."""
  workdir = tmp_path / "locked"
  workdir.mkdir()
  lock = workdir / "run.lock"
  lock.write_text(content)
  old = lock.stat().st_mtime - 60
  os.utime(lock, (old, old))
  with caplog.at_level("WARNING"):
    r = _run(str(workdir), [0.5] * 6, monkeypatch)
  assert _lock_holder(workdir)["pid"] == os.getpid()
  assert f"taking over the lock {lock}: it names no holder" in caplog.text
  r.ckpt.close()
  r.lock.release()
  assert not lock.exists()


def test_a_lock_being_written_is_not_taken_over(tmp_path, monkeypatch):
  """A just-created empty lock may be its creator's, about to name it: waited for, then the
  run is refused with the holder's name."""
  import json  # pylint: disable=import-outside-toplevel
  import socket  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  import threading  # pylint: disable=import-outside-toplevel
  workdir = tmp_path / "locked"
  workdir.mkdir()
  lock = workdir / "run.lock"
  live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    lock.write_text("")
    writer = threading.Timer(0.5, lambda: lock.write_text(
        json.dumps({"host": socket.gethostname(), "pid": live.pid})))
    writer.start()
    with pytest.raises(RuntimeError, match=f"in use by another run .*pid {live.pid}"):
      _run(str(workdir), [0.5], monkeypatch)
    writer.join()
    assert _lock_holder(workdir)["pid"] == live.pid
  finally:
    live.kill()
    live.wait()


def _logged_steps(workdir, tag="train/loss"):
  """The steps of `tag` TensorBoard shows (its reader of tensor summaries, which discards what
  a session wrote past a later session's start)."""
  # pylint: disable=import-outside-toplevel
  from tensorboard.backend.event_processing import plugin_event_accumulator
  acc = plugin_event_accumulator.EventAccumulator(str(workdir / "tensorboard"),
                                                  size_guidance={"tensors": 0})
  acc.Reload()
  return [e.step for e in acc.Tensors(tag)]


def test_tensorboard_shows_each_step_once_after_a_resume(tmp_path, monkeypatch):
  """Killed after logging step 3 with its checkpoint at step 2: the rerun logs step 3 again;
  its session start makes TensorBoard drop the first session's step 3."""
  import time  # pylint: disable=import-outside-toplevel
  workdir = tmp_path / "run"

  def run():
    r = _run(str(workdir), [0.5] * 6, monkeypatch)
    r.config.unlock()
    r.config.log_every = 1
    return r
  r = run()
  state, record, _ = r.resume(_toy_state(), ToyRecord())
  _drive(r, state, record, stop_after=3)              # checkpoint at 2, steps 1..3 logged
  r.writer.flush()
  r.lock.release()
  time.sleep(1.0 - time.time() % 1.0 + 0.05)          # event files are named by the second
  r2 = run()
  state, record, _ = r2.resume(_toy_state(), ToyRecord())
  assert r2.start_step == 2
  _drive(r2, state, record)
  assert _logged_steps(workdir) == [1, 2, 3, 4, 5, 6]


def test_resume_checks_how_the_training_images_reach_the_views():
  ok = {"format": "packed", "stored_size": None, "set": "p/list"}
  resized = {"format": "packed", "stored_size": 36, "set": "q/list"}
  folder_run = {"config": {"data": {"format": "folder"}}}
  checkpoints.check_resume_pixels(folder_run, ok, 4, "ckpt")            # lossless: same batches
  checkpoints.check_resume_pixels(folder_run, None, 4, "ckpt")          # not known: no check
  with pytest.raises(ValueError, match=r"data\.format: 'folder' \(the image files, decoded\) -> "
                                       r"'packed' \(stored resized to 36x36, q/list\)"):
    checkpoints.check_resume_pixels(folder_run, resized, 4, "ckpt")
  with pytest.raises(ValueError, match=r"data\.format: 'packed' \(stored resized to 36x36, "
                                       r"q/list\) -> 'packed' \(lossless, p/list\)"):
    checkpoints.check_resume_pixels({"train_pixels": resized}, ok, 4, "ckpt")
  # A packed run's checkpoint from before this record: not known, not refused.
  checkpoints.check_resume_pixels({"config": {"data": {"format": "packed"}}}, resized, 4, "c")


@pytest.mark.slow
def test_resume_refuses_training_images_stored_at_another_size(tmp_path, monkeypatch):
  """A run over the image files resumed over a packed set stored resized is refused, naming
  data.format old -> new; over a lossless packed set (the same batches) it resumes."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from eercl_jax.data import packed  # pylint: disable=import-outside-toplevel
  c = demo_source.get_config("runlocal")
  lines = []
  for i in range(8):
    Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 44, 3), np.uint8)).save(
        tmp_path / f"{i}.png")
    lines.append(f"{i}.png {i % len(c.data.class_names)}\n")
  (tmp_path / "list.txt").write_text("".join(lines))
  for root, resize in (("lossless", None), ("resized", c.data.resize)):
    packed.pack_list(str(tmp_path / "list.txt"), str(tmp_path), str(tmp_path / root / "list"),
                     c.data.class_names, resize)
  workdir = str(tmp_path / "run")

  def run(**data):
    r = _run(workdir, [0.5] * 6, monkeypatch)
    r.config.unlock()
    d = r.config.data
    d.synthetic.enabled, d.image_root = False, str(tmp_path)
    d.train_list, d.eval_lists = str(tmp_path / "list.txt"), {"target": str(tmp_path / "list.txt")}
    d.update(data)
    r.read_lists()
    return r
  r = run()
  state, record, _ = r.resume(_toy_state(), ToyRecord())
  _drive(r, state, record, stop_after=4)
  r.lock.release()
  r2 = run(format="packed", packed_root=str(tmp_path / "resized"))
  with pytest.raises(ValueError, match=r"data\.format: 'folder' \(the image files, decoded\) -> "
                                       r"'packed' \(stored resized to 36x36, .*resized.list\)"):
    r2.resume(_toy_state(), ToyRecord())
  r2.ckpt.close()
  r2.lock.release()
  r3 = run(format="packed", packed_root=str(tmp_path / "lossless"))
  state, _, _ = r3.resume(_toy_state(), ToyRecord())
  assert int(state.step) == 4
  r3.ckpt.close()
  r3.lock.release()
