"""AdaBN and source-only of the port (`config.method = 'adabn' | 'source_only'`) against
restatements of what they are.

AdaBN (Li et al. 2016) as the usual PyTorch recipe does it: every BN layer's running statistics
reset (`reset_running_stats()`) with `momentum = None` (a cumulative average), one pass over the
target list in train mode with dropout off, under `no_grad`. PyTorch's cumulative update
`running += (batch - running) / num_batches_tracked` leaves each running mean the average over
batches of the batches' means and each running variance the average of their unbiased
variances, every batch weighing the same - the last, smaller one included. Source-only: the
source model, untouched by the steps.

The reference shares only the network's forward (`model.apply` in train mode over one BN group,
on a copy of the model with its dropout rate set to 0) and its input normalisation; each BN
layer's input is captured by interception and its statistics computed here in float64.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import adapt as adapt_configs
from configs import demo_adapt
from eercl_jax import parallel, train_adapt
from eercl_jax.data import lists, pipelines
from tests import method_reference as ref_lib
from tests.conftest import assert_trees_close, random_variables

N = 20                 # target images
PASS_BATCH = 8         # AdaBN's pass: batches of 8, 8 and 4 images
B = 8                  # images per step
C, D = 7, 8            # classes, feature dim
SIZE = 16              # image side
DROPOUT = 0.5          # the ViT head's dropout: the pass must switch it off


def _model(backbone):
  return ref_lib.tiny_model(backbone, feat_dim=D, num_classes=C, dropout=DROPOUT)


def _config(backbone, method):
  c = demo_adapt.get_config()
  ref_lib.set_tiny_model(c.model, backbone, feat_dim=D, num_classes=C, dropout=DROPOUT)
  c.batch_size = B
  c.data.resize = c.data.crop = SIZE         # the test view is then the image itself
  c.adabn.batch_size = PASS_BATCH
  adapt_configs.baseline(c, method)
  return c


def _target_list(root, rs):
  """N tiny PNGs and their list; returns the images in list order."""
  images = ref_lib.random_images(rs, N, SIZE)
  ref_lib.write_target_list(root, images, rs, C)
  return images


def _bn_inputs(model, variables, x):
  """{BN layer path: its input} of one train-mode forward (one BN group)."""
  return ref_lib.train_forward_with_bn_inputs(model, variables, x,
                                              rngs={"dropout": jax.random.PRNGKey(1)})[1]


def _reference_adabn(model, variables, images, config):
  """PyTorch's cumulative AdaBN pass: the mean over batches of each batch's mean and unbiased
  variance, per BN layer, with dropout off."""
  no_dropout = model.clone(dropout=0.0)
  forward = jax.jit(_bn_inputs, static_argnums=0)
  per_batch = []
  for start in range(0, len(images), PASS_BATCH):   # the test loader: list order, no drop_last
    x = jnp.asarray(ref_lib.normalize_images(images[start:start + PASS_BATCH], config))
    per_batch.append(jax.device_get(forward(no_dropout, variables, x)))
  assert [len(next(iter(b.values()))) for b in per_batch] == [8, 8, 4]
  stats = {}
  for path in per_batch[0]:
    rows = [np.asarray(b[path], np.float64).reshape(-1, b[path].shape[-1]) for b in per_batch]
    node = stats
    for k in path:
      node = node.setdefault(k, {})
    node["mean"] = np.mean([r.mean(0) for r in rows], 0)
    node["var"] = np.mean([r.var(0, ddof=1) for r in rows], 0)
  return stats


@pytest.mark.parametrize("backbone", [pytest.param("resnet", marks=pytest.mark.slow), "vit"])
def test_adabn_statistics_match_pytorch_cumulative_average(backbone, tmp_path):
  config = _config(backbone, "adabn")
  model = _model(backbone)
  rs = np.random.RandomState(4)
  images = _target_list(str(tmp_path), rs)
  target_list = lists.read_list(str(tmp_path / "list.txt"), str(tmp_path),
                                config.data.class_names)
  variables = random_variables(model, rs, SIZE)
  mesh = parallel.create_mesh(jax.devices()[:1])
  built = train_adapt.build(config, mesh, variables, N)
  state0 = jax.device_get(built.state)
  # The pass runs once, before the first step.
  assert built.method.refresh_due(0) and not any(built.method.refresh_due(i) for i in range(1, 9))

  state, _ = built.refresh(built.state, target_list, 0, with_teacher=False)
  state = jax.device_get(state)
  want = _reference_adabn(model, variables, images, config)
  got_paths = sorted(jax.tree_util.keystr(p) for p, _ in
                     jax.tree_util.tree_leaves_with_path(state.batch_stats))
  assert got_paths == sorted(jax.tree_util.keystr(p) for p, _ in
                             jax.tree_util.tree_leaves_with_path(want))
  assert_trees_close(state.batch_stats, want, what="AdaBN statistics ")
  jax.tree_util.tree_map(np.testing.assert_array_equal, state.params, state0.params)

  # The steps leave the model as it is.
  batch = dict(image=ref_lib.random_images(rs, B, SIZE),
               index=np.arange(B, dtype=np.int32), label=np.zeros(B, np.int32))
  after, _ = built.step(jax.device_put(state, built.shardings), parallel.shard_batch(batch, mesh))
  after = jax.device_get(after)
  assert int(after.step) == 1
  jax.tree_util.tree_map(np.testing.assert_array_equal, after.params, state.params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, after.batch_stats, state.batch_stats)


@pytest.mark.parametrize("backbone", ["resnet", "vit"])
def test_source_only_steps_leave_the_source_model(backbone):
  config = _config(backbone, "source_only")
  model = _model(backbone)
  rs = np.random.RandomState(6)
  variables = random_variables(model, rs, SIZE)
  mesh = parallel.create_mesh(jax.devices()[:1])
  built = train_adapt.build(config, mesh, variables, N)
  assert not any(built.method.refresh_due(i) for i in range(10))   # no pass over the target
  state0 = jax.device_get(built.state)
  state = built.state
  for _ in range(2):
    batch = {k: ref_lib.random_images(rs, B, SIZE)
             for k in pipelines.view_keys(built.method.views)}
    batch.update(index=np.arange(B, dtype=np.int32), label=np.zeros(B, np.int32))
    state, metrics = built.step(state, parallel.shard_batch(batch, mesh))
    assert float(metrics["train/loss"]) == 0.0
  state = jax.device_get(state)
  assert int(state.step) == 2
  for part in ("params", "batch_stats", "opt_state", "banks"):
    jax.tree_util.tree_map(np.testing.assert_array_equal, getattr(state, part),
                           getattr(state0, part))
  jax.tree_util.tree_map(np.testing.assert_array_equal, state.params, variables["params"])
