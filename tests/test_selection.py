"""Label-free model selection: the IM and SND scores against a direct numpy computation of their
definitions (SND: its authors' code), the best checkpoint an adaptation keeps per rule (oracle,
im, snd) and the last, results.json's selections, and the tools' checkpoint choice."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo_adapt
from eercl_jax import checkpoints, run as run_lib, selection
from tests.test_run import ToyIterator, ToyRecord, ToyState


def _softmax(x, axis=-1):
  e = np.exp(x - x.max(axis, keepdims=True))
  return e / e.sum(axis, keepdims=True)


def _numpy_im(p, eps=1e-5):
  m = p.mean(0)
  return -(m * np.log(m + eps)).sum() - np.mean(-(p * np.log(p + eps)).sum(1))


def _numpy_snd(p, t=0.05):
  """The SND authors' `neighbor_density`: normalised predictions, similarities over T with the
  own similarity -1/T (not removed), a row-wise softmax, the mean entropy with 1e-5."""
  f = p / np.linalg.norm(p, axis=1, keepdims=True)
  m = f @ f.T / t
  np.fill_diagonal(m, -1.0 / t)
  q = _softmax(m, 1)
  return np.mean(-(q * np.log(q + 1e-5)).sum(1))


@pytest.mark.parametrize("n", [5, 37, 130])
def test_im_and_snd_equal_their_definitions(n):
  rs = np.random.RandomState(n)
  p = _softmax(3 * rs.randn(n, 7)).astype(np.float32)
  assert selection.im_score(p) == pytest.approx(_numpy_im(p.astype(np.float64)), rel=1e-5)
  want = _numpy_snd(p.astype(np.float64))
  # In blocks that do not divide N (the padded rows must not count), and in one block.
  assert selection.snd_score(p, block=16) == pytest.approx(want, rel=1e-4)
  assert selection.snd_score(p) == pytest.approx(want, rel=1e-4)


def test_im_ranks_as_its_definition_says():
  rs = np.random.RandomState(0)
  confident_diverse = _softmax(10 * np.eye(7)[rs.randint(0, 7, 200)] + rs.randn(200, 7))
  collapsed = _softmax(10 * np.eye(7)[np.zeros(200, int)] + rs.randn(200, 7))
  uncertain = _softmax(0.1 * rs.randn(200, 7))
  im = [selection.im_score(p) for p in (confident_diverse, collapsed, uncertain)]
  assert im[0] > im[1] and im[0] > im[2]       # confident and diverse is what IM rewards


def _adapt_run(workdir, script, monkeypatch, num_steps=None):
  """A run skeleton of an adaptation (label-free rules on) with scripted evaluations:
  `script` is a list of (target accuracy, im, snd), one per evaluation from the (re)start."""
  c = demo_adapt.get_config("runlocal")
  c.num_steps = num_steps or len(script)
  c.log_every, c.eval_every, c.checkpoint_every = 1, 1, 1
  r = run_lib.Run(c, workdir, "adapt", label_free=True)
  scripted = iter(script)

  def fake_evaluate(step, variables, save_confusions=True):
    del step, variables, save_confusions
    acc, im, snd = next(scripted)
    return {"target": {"accuracy": acc, "mean_class_accuracy": acc, "im": im, "snd": snd},
            "source": {"accuracy": 0.5, "mean_class_accuracy": 0.5}}
  monkeypatch.setattr(r, "evaluate", fake_evaluate)
  return r


def test_an_adaptation_keeps_a_best_checkpoint_per_rule(tmp_path, monkeypatch):
  workdir = str(tmp_path / "adapt")
  #        oracle best at 2, IM best at 3 (negative values: no "-1 = none yet"), SND best at 1
  script = [(0.3, -0.9, 5.0), (0.8, -0.7, 4.0), (0.6, -0.2, 4.5), (0.5, -0.5, 3.0)]
  r = _adapt_run(workdir, script, monkeypatch)
  state, record, _ = r.resume(ToyState(step=jnp.zeros((), jnp.int32), params={"w": jnp.zeros(2)},
                                       batch_stats={}), ToyRecord())
  for step in r.steps():
    state = state.replace(step=jnp.asarray(step, jnp.int32), params={"w": jnp.full(2, step)})
    r.end_of_step(step, state, {"train/loss": jnp.asarray(1.0)}, ToyIterator(step), record)
  r.finish(state)
  steps = {name: sorted(os.listdir(os.path.join(workdir, name)))
           for name in ("best", "best_im", "best_snd", "checkpoints")}
  assert steps == {"best": ["2"], "best_im": ["3"], "best_snd": ["1"], "checkpoints": ["4"]}
  res = json.load(open(os.path.join(workdir, "results.json")))
  sel = res["selections"]
  assert {k: (v["step"], v["folder"], v["uses_target_labels"]) for k, v in sel.items()} == {
      "oracle": (2, "best", True), "im": (3, "best_im", False), "snd": (1, "best_snd", False),
      "last": (4, "checkpoints", False)}
  assert sel["im"]["value"] == pytest.approx(-0.2)
  assert sel["im"]["lists"]["target"]["accuracy"] == pytest.approx(0.6)
  assert sel["snd"]["lists"]["target"]["accuracy"] == pytest.approx(0.3)
  assert [e["step"] for e in res["evaluations"]] == [1, 2, 3, 4]
  assert res["evaluations"][2] == {"step": 3, "oracle": 0.6, "im": -0.2, "snd": 4.5}
  assert res["method"] == "eercl"

  # The tools' choice: which=oracle|im|snd|best|latest, and 'auto' = SND for an adaptation.
  pick = lambda which: os.path.basename(checkpoints.resolve_run_dir(workdir, which))
  assert [pick(w) for w in ("auto", "best", "oracle", "im", "snd", "latest")] == [
      "best_snd", "best", "best", "best_im", "best_snd", "checkpoints"]


def test_label_free_rules_resume_with_their_bests(tmp_path, monkeypatch):
  workdir = str(tmp_path / "adapt")
  script = [(0.3, 0.1, 5.0), (0.8, 0.2, 4.0)]
  r = _adapt_run(workdir, script, monkeypatch, num_steps=4)
  state, record, _ = r.resume(ToyState(step=jnp.zeros((), jnp.int32), params={"w": jnp.zeros(2)},
                                       batch_stats={}), ToyRecord())
  for step in (1, 2):
    state = state.replace(step=jnp.asarray(step, jnp.int32))
    r.end_of_step(step, state, {"train/loss": jnp.asarray(1.0)}, ToyIterator(step), record)
  r.ckpt.close()
  r.lock.release()
  # Resumed at step 2: a step-3 SND below the step-1 best must not replace best_snd/.
  r2 = _adapt_run(workdir, [(0.1, 0.05, 4.9), (0.1, 0.3, 4.95)], monkeypatch, num_steps=4)
  state, record, _ = r2.resume(state, ToyRecord())
  assert r2.bests["snd"].step == 1 and r2.bests["im"].step == 2 and len(r2.history) == 2
  for step in r2.steps():
    state = state.replace(step=jnp.asarray(step, jnp.int32))
    r2.end_of_step(step, state, {"train/loss": jnp.asarray(1.0)}, ToyIterator(step), record)
  r2.finish(state)
  assert sorted(os.listdir(os.path.join(workdir, "best_snd"))) == ["1"]
  assert sorted(os.listdir(os.path.join(workdir, "best_im"))) == ["4"]


def test_select_by_a_label_free_rule_puts_it_in_best(tmp_path, monkeypatch):
  workdir = str(tmp_path / "adapt")
  c_script = [(0.9, 0.1, 3.0), (0.2, 0.2, 4.0)]
  monkeypatch.setattr(demo_adapt, "get_config", _with_select_by(demo_adapt.get_config, "snd"))
  r = _adapt_run(workdir, c_script, monkeypatch)
  state, record, _ = r.resume(ToyState(step=jnp.zeros((), jnp.int32), params={"w": jnp.zeros(2)},
                                       batch_stats={}), ToyRecord())
  for step in r.steps():
    state = state.replace(step=jnp.asarray(step, jnp.int32))
    r.end_of_step(step, state, {"train/loss": jnp.asarray(1.0)}, ToyIterator(step), record)
  r.finish(state)
  assert sorted(os.listdir(os.path.join(workdir, "best"))) == ["2"]          # SND's
  assert sorted(os.listdir(os.path.join(workdir, "best_oracle"))) == ["1"]
  pick = lambda which: os.path.basename(checkpoints.resolve_run_dir(workdir, which))
  assert (pick("snd"), pick("oracle"), pick("auto")) == ("best", "best_oracle", "best")


def _with_select_by(get_config, rule):
  def patched(arg=None):
    c = get_config(arg)
    c.data.select_by = rule
    return c
  return patched
