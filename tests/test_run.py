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
from eercl_jax import checkpoints, run as run_lib
from tests.conftest import tiny


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
  c = tiny(demo_source.get_config())
  c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = 6, 3, 1, 2
  r = run_lib.Run(c, workdir, "source")
  scripted = iter(accuracies)

  def fake_evaluate(step, variables, save_confusions=True):
    del variables, save_confusions
    acc = next(scripted)
    return {"source": {"accuracy": acc}, "target": {"accuracy": acc / 2}}
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
  assert r.best == run_lib.Best(0.7, 4)        # 0.7 at step 2, tied at step 4: the later wins
  best_step, meta = checkpoints.read_meta(os.path.join(workdir, "best"))
  assert best_step == 4 and meta["best"] == {"value": 0.7, "step": 4}
  assert meta["stream"] == 40 and meta["arch"]["size"] == "mu/8"
  r.ckpt.close()

  # Resuming restores the state, the typed record, the best so far and the iterator position.
  r2 = _run(workdir, [0.7, 0.9], monkeypatch)
  fresh = ToyState(step=jnp.zeros((), jnp.int32), params={"w": jnp.zeros(3)}, batch_stats={})
  state, record, it_state = r2.resume(fresh, ToyRecord())
  assert int(state.step) == 4 and list(state.params["w"]) == [4, 4, 4]
  assert record == ToyRecord(stream=40) and it_state == {"position": 4, "blob": b"\x00\x01"}
  assert r2.best == run_lib.Best(0.7, 4) and list(r2.steps()) == [5, 6]
  for step in r2.steps():
    state = state.replace(step=jnp.asarray(step, jnp.int32))
    r2.end_of_step(step, state, {"train/loss": jnp.asarray(1.0)}, ToyIterator(step), record)
  assert r2.best == run_lib.Best(0.9, 6)      # 0.7 at step 5 ties the resumed best: step 5
  out = r2.finish(state)
  assert out["best"] == {"value": 0.9, "step": 6} and out["final"]["source"] == 0.9
  assert sorted(os.listdir(os.path.join(workdir, "best"))) == ["6"]


def test_resume_refuses_another_architecture(tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  r = _run(workdir, [0.5] * 6, monkeypatch)
  state = ToyState(step=jnp.zeros((), jnp.int32), params={"w": jnp.zeros(3)}, batch_stats={})
  state, _, _ = r.resume(state)
  r.save(2, state.replace(step=jnp.asarray(2)), ToyIterator(2))
  r.ckpt.close()
  c = tiny(demo_source.get_config())
  c.model.size = "Ti/8"
  other = run_lib.Run(c, workdir, "source")
  with pytest.raises(ValueError, match="model.size: checkpoint 'mu/8' vs config 'Ti/8'"):
    other.resume(state)
