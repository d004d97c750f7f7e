"""The adaptation stage: the sharded step on 1 vs 8 devices, exact resume (banks, EMA teacher,
ring pointers), source-checkpoint checks and the CLI."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo_adapt
from eercl_jax import logs, optim, parallel, train_adapt
from eercl_jax.data import pipelines, run_lists
from eercl_jax.models import eercl
from tests.conftest import REPO


def _config(source_run, **overrides):
  c = demo_adapt.get_config("runlocal")
  c.source_checkpoint = source_run
  c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = 4, 2, 4, 2
  c.adapt.refresh_every = 2
  c.adapt.negative_bank_size = 48          # not a multiple of the batch: exercises the ring truncation
  c.adapt.refresh_batch_size = 64
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def _built(config, mesh):
  variables, _ = train_adapt.load_source_variables(config, eercl.create_model(config.model),
                                                   mesh)
  target_list, _ = run_lists.read_run_lists(config.data)
  return train_adapt.build(config, mesh, variables, len(target_list)), target_list


def _steps(config, devices, batches):
  mesh = parallel.create_mesh(devices)
  built, target_list = _built(config, mesh)
  state, _ = built.refresh(built.state, target_list, 0, with_teacher=True)
  metrics = []
  for b in batches:
    state, m = built.step(state, parallel.shard_batch(b, mesh))
    metrics.append(logs.to_host_scalars(m))
  return state, metrics


def test_adapt_step_on_one_and_eight_devices_agree(data_dir, source_run, monkeypatch):
  monkeypatch.chdir(data_dir)
  config = _config(source_run)
  target_list, _ = run_lists.read_run_lists(config.data)
  it = iter(pipelines.train_dataset(target_list, views=("weak", "strong", "strong"),
                                    view_cfg=pipelines.view_config(config.data),
                                    global_batch=config.batch_size, seed=0))
  batches = [next(it) for _ in range(2)]
  s1, m1 = _steps(config, jax.devices()[:1], batches)
  s1 = jax.device_get(s1)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  for shard_banks in (False, True):   # replicated banks, then banks sharded by rows
    config.adapt.shard_banks = shard_banks
    s8, m8 = _steps(config, jax.devices(), batches)
    if shard_banks:  # memory per device is N*D/devices
      assert len(s8.banks.aad_feat.sharding.device_set) == 8
      assert s8.banks.aad_feat.addressable_shards[0].data.shape[0] == len(target_list) // 8
    s8 = jax.device_get(s8)
    for a, b in zip(m1, m8):
      for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k
    jax.tree_util.tree_map(close, (s1.params, s1.teacher_params, s1.banks),
                           (s8.params, s8.teacher_params, s8.banks))
  # The frozen classifier did not move; the rest did; the teacher moved 1% of the way.
  src = jax.device_get(train_adapt.load_source_variables(
      config, eercl.create_model(config.model), parallel.create_mesh(jax.devices()[:1]))[0])
  jax.tree_util.tree_map(np.testing.assert_array_equal, src["params"]["classifier"],
                         s1.params["classifier"])
  assert np.abs(src["params"]["sfda_bottleneck"]["kernel"]
                - s1.params["sfda_bottleneck"]["kernel"]).max() > 0
  assert int(s1.banks.neg_weak_ptr) == 0 and int(s1.banks.neg_strong_ptr) == 0  # 32, then 48->0


def test_resume_restores_banks_teacher_and_pointers(data_dir, source_run, monkeypatch, tmp_path):
  monkeypatch.chdir(data_dir)
  whole = train_adapt.train_and_evaluate(_config(source_run, num_steps=3),
                                         str(tmp_path / "whole"))
  train_adapt.train_and_evaluate(_config(source_run, num_steps=2), str(tmp_path / "split"))
  resumed = train_adapt.train_and_evaluate(_config(source_run, num_steps=3),
                                           str(tmp_path / "split"))
  assert "resumed from" in open(tmp_path / "split" / "logs" / "train.log").read()
  assert resumed["final"] == pytest.approx(whole["final"])
  assert resumed["source_only"] == pytest.approx(whole["source_only"])

  def state_of(workdir):
    config = _config(source_run, num_steps=3)
    mesh = parallel.create_mesh(jax.devices()[:1])
    variables, _ = train_adapt.load_source_variables(config, eercl.create_model(config.model),
                                                     mesh)
    template = train_adapt.build(config, mesh, variables, 112).state
    from eercl_jax import checkpoints  # pylint: disable=import-outside-toplevel
    ck = checkpoints.RunCheckpoints(str(workdir))
    state, _, _ = ck.restore_latest(checkpoints.abstract_like(template))
    return jax.device_get(state)

  a, b = state_of(tmp_path / "whole"), state_of(tmp_path / "split")
  assert int(a.step) == int(b.step) == 3
  assert int(a.banks.neg_weak_ptr) == int(b.banks.neg_weak_ptr) == 32  # 0 -> 32 -> 0 (wrap) -> 32
  close = lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  jax.tree_util.tree_map(close, (a.params, a.teacher_params, a.teacher_batch_stats, a.banks),
                         (b.params, b.teacher_params, b.teacher_batch_stats, b.banks))


def test_source_checkpoint_mismatch_names_the_difference(data_dir, source_run, monkeypatch,
                                                         tmp_path):
  monkeypatch.chdir(data_dir)
  config = _config(source_run)
  config.model.feat_dim = 24
  with pytest.raises(ValueError, match="model.feat_dim: checkpoint 16 vs config 24"):
    train_adapt.train_and_evaluate(config, str(tmp_path / "bad"))
  config = _config(source_run)
  config.data.class_names = tuple(reversed(config.data.class_names))
  # The synthetic lists carry their class order: refused at the list, before the checkpoint.
  with pytest.raises(ValueError, match=r"labels index \(angry, .* but config\.data\.class_names "
                                       r"is \(surprise, .*the same names in another order"):
    train_adapt.train_and_evaluate(config, str(tmp_path / "bad2"))
  # Lists without a class-order file read (with a warning): the checkpoint's names refuse them.
  for name, path in [("train", config.data.train_list), *config.data.eval_lists.items()]:
    bare = str(tmp_path / f"bare_{name}.txt")
    shutil.copyfile(path, bare)
    if name == "train":
      config.data.train_list = bare
    else:
      config.data.eval_lists[name] = bare
  with pytest.raises(ValueError, match="data.class_names: checkpoint"):
    train_adapt.train_and_evaluate(config, str(tmp_path / "bad2b"))
  with pytest.raises(FileNotFoundError, match="does-not-exist"):
    train_adapt.train_and_evaluate(_config("does-not-exist"), str(tmp_path / "bad3"))


def test_cli_adapts_and_prints_side_by_side(data_dir, source_run, tmp_path):
  workdir = tmp_path / "adapt"
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.run(
      [sys.executable, "-m", "eercl_jax.main", f"--config={REPO}/configs/demo_adapt.py:runlocal",
       f"--workdir={workdir}", f"--config.source_checkpoint={source_run}",
       "--config.num_steps=3", "--config.eval_every=3", "--config.adapt.refresh_every=2",
       "--config.adapt.refresh_batch_size=64"],
      cwd=data_dir, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "[adapt] final: target: source-only " in proc.stdout
  assert "; forgetting (source test): source-only " in proc.stdout
  assert "-> adapted " in proc.stdout and "(mean class " in proc.stdout
  assert os.listdir(workdir / "checkpoints") == ["3"] and os.listdir(workdir / "best")
  # Run records: the resolved config, and results with the source model's evaluation.
  assert json.load(open(workdir / "config.json"))["source_checkpoint"] == source_run
  res = json.load(open(workdir / "results.json"))
  assert res["stage"] == "adapt" and res["config_file"] == f"{REPO}/configs/demo_adapt.py:runlocal"
  assert res["selection"] == "best target accuracy (oracle selection: uses target labels)"
  assert res["last_step"] == res["best_step"] == 3
  assert [(k, v["role"]) for k, v in res["lists"].items()] == [("target", "target"),
                                                               ("source", "source_test")]
  for entry in res["lists"].values():
    for pair in (entry["source_only"], entry["best"], entry["last"]):
      assert set(pair) == {"accuracy", "mean_class_accuracy"} and 0 <= pair["accuracy"] <= 1
  log = open(workdir / "logs" / "train.log").read()
  for word in ("aad_attract", "aad_disperse", "instance_nce", "mask_acc", "cluster_mask_acc", "mean_max_prob",
               "bank refresh", "oracle selection"):
    assert word in log, word


def test_loop_refresh_cadence_new_stream_and_config_reach(data_dir, source_run, monkeypatch,
                                                          tmp_path):
  """The loop alone, with the step and the refresh replaced by recorders: the refresh runs before
  steps 1, 3, 5 (the original's it 0, 2, 4; the teacher only at it 0), each refresh starts a new
  shuffled stream (the refresh step's own batch comes from the previous one), the stream counter
  is checkpointed, and the frozen classifier reaches the optimiser."""
  monkeypatch.chdir(data_dir)
  config = _config(source_run, num_steps=5)
  config.checkpoint_every = 5
  refreshes, seen, frozen_arg = [], [], []

  def fake_refresh(state, target_list, refresh_index, *, with_teacher, resident=None):
    del target_list, resident
    refreshes.append((int(state.step), refresh_index, with_teacher))
    return state, {"refresh/argmax_acc": 0.0, "refresh/cluster_acc": 0.0}

  def fake_step(state, batch):
    seen.append(np.asarray(jax.device_get(batch["index"])))
    zero = jnp.zeros(())
    return state.replace(step=state.step + 1), {
        "train/loss": zero, "count/mask": zero + 1, "count/mask_correct": zero,
        "count/cluster_mask_correct": zero}

  real_build, real_for_model = train_adapt.build, optim.for_model

  def recording_build(*args, **kwargs):
    return dataclasses.replace(real_build(*args, **kwargs), refresh=fake_refresh, step=fake_step)

  def recording_for_model(config, frozen=(), **kwargs):
    frozen_arg.append(tuple(frozen))
    return real_for_model(config, frozen=frozen, **kwargs)

  monkeypatch.setattr(train_adapt, "build", recording_build)
  monkeypatch.setattr(optim, "for_model", recording_for_model)
  train_adapt.train_and_evaluate(config, str(tmp_path / "loop"))

  assert refreshes == [(0, 0, True), (2, 1, False), (4, 2, False)]
  assert frozen_arg == [("classifier",)]
  target_list, _ = run_lists.read_run_lists(config.data)

  def stream(k):
    return iter(pipelines.train_dataset(
        target_list, views=("weak", "strong", "strong"),
        view_cfg=pipelines.view_config(config.data), global_batch=config.batch_size,
        seed=train_adapt.stream_seed(config.seed, k)))
  s0, s1, s2 = stream(0), stream(1), stream(2)
  want = [next(s0), next(s1), next(s1), next(s2), next(s2)]   # steps 1..5
  for step, (got, exp) in enumerate(zip(seen, want), 1):
    np.testing.assert_array_equal(got, exp["index"], err_msg=f"step {step}")
  from eercl_jax import checkpoints  # pylint: disable=import-outside-toplevel
  _, meta = checkpoints.read_meta(str(tmp_path / "loop" / "checkpoints"))
  assert meta["stream"] == 3

  config.adapt.fix_classifier = False
  frozen_arg.clear()
  config.num_steps = 1
  train_adapt.train_and_evaluate(config, str(tmp_path / "unfrozen"))
  assert frozen_arg == [()]


def test_refresh_reads_its_config(data_dir, source_run, monkeypatch):
  """refresh_view, refresh_batch_size and the refresh index (the epoch of the weak view's
  randomness) reach the evaluation pass that fills the banks."""
  monkeypatch.chdir(data_dir)
  config = _config(source_run)
  config.adapt.refresh_view, config.adapt.refresh_batch_size = "test", 32
  calls = []
  real = pipelines.eval_batches

  def recording(fer_list, **kw):
    calls.append({k: kw[k] for k in ("view", "batch_size", "epoch")})
    return real(fer_list, **kw)
  monkeypatch.setattr(pipelines, "eval_batches", recording)
  built, target_list = _built(config, parallel.create_mesh(jax.devices()[:1]))
  built.refresh(built.state, target_list, 3, with_teacher=False)
  assert calls == [{"view": "test", "batch_size": 32, "epoch": 3}]


def test_a_non_finite_source_model_is_refused(data_dir, source_run, monkeypatch, tmp_path):
  from eercl_jax import checkpoints  # pylint: disable=import-outside-toplevel
  monkeypatch.chdir(data_dir)
  config = _config(source_run)
  mesh = parallel.create_mesh(jax.devices()[:1])
  model = eercl.create_model(config.model)
  variables, step = train_adapt.load_source_variables(config, model, mesh)
  variables = jax.tree_util.tree_map(np.array, jax.device_get(variables))   # writable copies
  variables["params"]["sfda_bn"]["scale"][0] = np.nan
  _, meta = checkpoints.read_meta(os.path.join(source_run, "best"))
  ckpt = checkpoints.RunCheckpoints(str(tmp_path / "nan_source"))
  ckpt.save(step, variables, {"iterator": None}, meta, best=True)
  ckpt.close()
  config.source_checkpoint = str(tmp_path / "nan_source")
  with pytest.raises(ValueError, match=r"non-finite values in \['params'\]\['sfda_bn'\]\['scale'\]"):
    train_adapt.load_source_variables(config, model, mesh)


def test_an_adaptation_checkpoint_is_not_a_source_model(data_dir, source_run, monkeypatch,
                                                        tmp_path):
  from eercl_jax import checkpoints  # pylint: disable=import-outside-toplevel
  monkeypatch.chdir(data_dir)
  config = _config(source_run)
  mesh = parallel.create_mesh(jax.devices()[:1])
  model = eercl.create_model(config.model)
  variables, step = train_adapt.load_source_variables(config, model, mesh)
  _, meta = checkpoints.read_meta(os.path.join(source_run, "best"))
  ckpt = checkpoints.RunCheckpoints(str(tmp_path / "adapt_run"))
  ckpt.save(step, jax.device_get(variables), {"iterator": None}, dict(meta, stage="adapt"),
            best=True)
  ckpt.close()
  config.source_checkpoint = str(tmp_path / "adapt_run")
  with pytest.raises(ValueError, match="holds a checkpoint of an 'adapt' run"):
    train_adapt.load_source_variables(config, model, mesh)
