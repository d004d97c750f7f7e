"""The source stage: the sharded step on 1 vs 8 devices, checkpoint/resume, and the CLI."""
import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import demo_source
from eercl_jax import checkpoints, logs, parallel, train_source
from eercl_jax.data import pipelines, run_lists
from eercl_jax.models import eercl
from tests.conftest import REPO


def _config(**overrides):
  c = demo_source.get_config("runlocal")
  c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = 4, 2, 4, 2
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def _run_steps(config, devices, batches):
  mesh = parallel.create_mesh(devices)
  built = train_source.build(config, mesh)
  state = built.state
  out = []
  for b in batches:
    state, metrics = built.step(state, parallel.shard_batch(b, mesh))
    out.append(logs.to_host_scalars(metrics))
  return jax.device_get(state), out


@pytest.mark.slow
def test_step_on_one_and_eight_devices_agree(data_dir, monkeypatch):
  monkeypatch.chdir(data_dir)
  config = _config()
  train_list, _ = run_lists.read_run_lists(config.data)
  it = iter(pipelines.train_dataset(train_list, views=("weak",),
                                    view_cfg=pipelines.view_config(config.data),
                                    global_batch=config.batch_size, seed=0))
  batches = [next(it) for _ in range(3)]
  assert len(jax.devices()) == 8
  s1, m1 = _run_steps(config, jax.devices()[:1], batches)
  s8, m8 = _run_steps(config, jax.devices(), batches)
  for a, b in zip(m1, m8):
    for k in a:
      assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                         (s1.params, s1.batch_stats), (s8.params, s8.batch_stats))
  # The steps did train: parameters moved.
  s0, _ = _run_steps(config, jax.devices()[:1], [])
  moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), s0.params, s1.params)
  assert max(jax.tree_util.tree_leaves(moved)) > 0


@pytest.mark.slow
def test_resume_continues_exactly(data_dir, monkeypatch, tmp_path):
  monkeypatch.chdir(data_dir)
  whole = train_source.train_and_evaluate(_config(), str(tmp_path / "whole"))
  train_source.train_and_evaluate(_config(num_steps=2), str(tmp_path / "split"))
  resumed = train_source.train_and_evaluate(_config(), str(tmp_path / "split"))
  assert "resumed from" in open(tmp_path / "split" / "logs" / "train.log").read()
  assert resumed["final"] == pytest.approx(whole["final"])
  # results.json of the resumed run: the best step's accuracies survive the resume (read back
  # from the checkpoint), the wall time adds up over both starts.
  res = json.load(open(tmp_path / "split" / "results.json"))
  assert res["last_step"] == 4 and res["best_step"] in (2, 4)
  cm = np.asarray(json.load(open(tmp_path / "split" / "logs" /
                                 f"confusion_{res['best_step']:06d}.json"))["confusions"]["source"])
  assert res["lists"]["source"]["best"]["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
  assert res["lists"]["source"]["last"]["accuracy"] == pytest.approx(resumed["final"]["source"])

  def params_of(workdir):
    ckpt = checkpoints.RunCheckpoints(str(workdir))
    assert ckpt.latest_step() == 4
    model = eercl.create_model(_config().model)
    shapes = jax.eval_shape(lambda: eercl.init_variables(model, jax.random.PRNGKey(0), 32))
    return checkpoints.restore_subtree(str(workdir / "checkpoints"), dict(shapes))

  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         params_of(tmp_path / "whole"), params_of(tmp_path / "split"))


def _cli(args, cwd):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run([sys.executable, "-m", "eercl_jax.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)



@pytest.mark.slow
def test_cli_trains_checkpoints_and_logs(data_dir, tmp_path):
  workdir = tmp_path / "run"
  proc = _cli([f"--config={REPO}/configs/demo_source.py:runlocal", f"--workdir={workdir}",
               "--config.num_steps=6", "--config.log_every=2", "--config.eval_every=3",
               "--config.checkpoint_every=3"], cwd=data_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # The target first, then the source test set; mean class accuracy beside accuracy.
  assert "[source] final: target accuracy " in proc.stdout
  assert "; source test accuracy " in proc.stdout and "(mean class " in proc.stdout
  results = json.load(open(workdir / "results.json"))
  assert results["config_file"] == f"{REPO}/configs/demo_source.py:runlocal"
  assert json.load(open(workdir / "config.json"))["num_steps"] == 6
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
  assert os.listdir(workdir / "best")
  log = open(workdir / "logs" / "train.log").read()
  assert "ETA" in log and "step 6/6" in log
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  events = glob.glob(str(workdir / "tensorboard" / "events.out.tfevents.*"))
  assert events
  acc = event_accumulator.EventAccumulator(events[0], size_guidance={"tensors": 0})
  acc.Reload()
  tags = set(acc.Tags()["tensors"]) | set(acc.Tags()["scalars"])
  assert {"train/loss", "train/lr", "eval/source_accuracy", "eval/target_accuracy"} <= tags


def test_cli_rejects_a_misspelt_key(data_dir, tmp_path):
  proc = _cli([f"--config={REPO}/configs/demo_source.py", f"--workdir={tmp_path}",
               "--config.optim.lrr=0.1"], cwd=data_dir)
  assert proc.returncode != 0
  assert "lrr" in proc.stderr


def test_init_from_loads_a_local_backbone_into_the_source_state(tmp_path):
  """config.model.init_from goes through the same build the loop uses."""
  from eercl_jax.weights import convert  # pylint: disable=import-outside-toplevel
  config = _config()
  model = eercl.create_model(config.model)
  donor = eercl.init_variables(model, jax.random.PRNGKey(7), config.data.crop)
  path = str(tmp_path / "backbone.npz")
  convert.export_backbone_npz(donor, config.model, path)
  config.model.init_from = path
  mesh = parallel.create_mesh(jax.devices()[:1])
  state = train_source.build(config, mesh).state
  jax.tree_util.tree_map(np.testing.assert_array_equal, donor["params"]["backbone"],
                         state.params["backbone"])
  # The head is newly initialised, not copied.
  assert not np.allclose(donor["params"]["sfda_bottleneck"]["kernel"],
                         state.params["sfda_bottleneck"]["kernel"])
  config.model.init_from = str(tmp_path / "missing.npz")
  with pytest.raises((FileNotFoundError, ValueError), match="missing.npz"):
    train_source.build(config, mesh)


def test_per_device_batch_size_scales_with_devices():
  config = _config()
  parallel.resolve_batch_sizes(config)
  assert config.batch_size == 32
  config.per_device_batch_size = 4
  parallel.resolve_batch_sizes(config)
  assert config.batch_size == 4 * jax.device_count() == 32

