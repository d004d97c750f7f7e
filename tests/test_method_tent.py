"""Two Tent steps of the port (`config.method = 'tent'` with the `method=tent` recipe of
configs/adapt.py) against a restatement of the authors' `tent.py` (DequanWang/tent @ e9e926a).

The authors' step (`forward_and_adapt`, tent.py L48-61): one forward of the model in train mode
on the un-augmented batch (BN normalising with the batch's statistics), loss = the batch mean of
-sum_c softmax(z)_c log_softmax(z)_c (no epsilon), backward, `torch.optim.Adam(lr=1e-3,
betas=(0.9, 0.999), eps=1e-8, weight_decay=0)` over the affine weight and bias of every
BatchNorm2d (`collect_params`, L64-80), in one parameter group with a constant learning rate;
everything else is frozen (`configure_model`, L96-110). This project's backbones map the
BatchNorm2d layers to the backbone's normalisation layers (every BN of the ResNet; the ViT's
backbone has no BN, so its LayerNorms: docs/deviations.md#tent); the head's BNs (the authors'
BatchNorm1d) stay frozen but normalise with batch statistics.

The reference below shares only the network's forward (`model.apply`, train mode, one BN group:
the authors' single GPU) and its input normalisation. Restated here: which parameters train
(by their layer names), the loss, torch's Adam with bias correction in float64, and the BN
running statistics (PyTorch: running = 0.9 running + 0.1 batch statistic, the variance
unbiased) from each BN layer's input, captured by interception. Checked, for both tiny
backbones: the loss, the gradient of every trained parameter (the port's Adam first moment after
step 1 is (1 - b1) g), every parameter after each step (the untrained ones bit-identical), and
the running statistics after each step.
"""
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import adapt as adapt_configs
from configs import demo_adapt
from eercl_jax import parallel, train_adapt
from tests import method_reference as ref_lib
from tests.conftest import assert_trees_close, random_variables

B = 8                  # images per step: one BN group, as the authors' single GPU
N = 20                 # target images
C, D = 7, 8            # classes, feature dim
SIZE = 16              # image side
# The authors' optimiser (conf.py L73-91, cfgs/tent.yaml): Adam, one group, constant lr.
LR, B1, B2, EPS = 1e-3, 0.9, 0.999, 1e-8
# A gradient entry below this may be float32 noise around an exact zero (the ViT's last
# LayerNorm bias, see the end of the test): Adam turns such noise into an arbitrary update of up
# to lr, so these entries are only checked to stay within lr a step.
NOISE = 1e-6


def _model(backbone):
  return ref_lib.tiny_model(backbone, feat_dim=D, num_classes=C)


def _config(backbone):
  c = demo_adapt.get_config()
  ref_lib.set_tiny_model(c.model, backbone, feat_dim=D, num_classes=C)
  c.batch_size, c.num_steps = B, 4
  adapt_configs.baseline(c, "tent")          # the authors' optimiser, BN over the whole batch
  assert c.bn_group_size == B
  return c


# ------------------------------------------------------------------------------------------------
# the reference

# What the authors train, restated on this project's layer names: the affine of the backbone's
# normalisation layers - the ResNet's BNs (bn1..3, downsample_bn), the ViT's LayerNorms.
_TRAINED_LAYER = re.compile(r"^(bn\d+|downsample_bn|LayerNorm_\d+|encoder_norm)$")


def _trained(path):
  keys = [getattr(k, "key", None) for k in path]
  return (keys[0] == "backbone" and keys[-1] in ("scale", "bias")
          and bool(_TRAINED_LAYER.match(keys[-2])))


def _loss_and_bn_inputs(model, params, batch_stats, x):
  """The authors' loss on one train-mode forward, and every BN layer's input ({path: x})."""
  (_, logits), inputs = ref_lib.train_forward_with_bn_inputs(
      model, {"params": params, "batch_stats": batch_stats}, x)
  loss = jnp.mean(-jnp.sum(jax.nn.softmax(logits, 1) * jax.nn.log_softmax(logits, 1), 1))
  return loss, (logits, inputs)


_ref_grad = jax.jit(jax.grad(_loss_and_bn_inputs, argnums=1, has_aux=True), static_argnums=0)


def _ref_step(model, ref, images, config):
  """One step of the authors' Tent; `ref` holds float64 numpy trees and Adam's state."""
  grad, (logits, bn_inputs) = _ref_grad(model, ref_lib.float32_tree(ref["params"]),
                                        ref_lib.float32_tree(ref["stats"]),
                                        jnp.asarray(ref_lib.normalize_images(images, config)))
  grad = ref_lib.float64_tree(grad)
  z = np.asarray(logits, np.float64)
  z = z - z.max(1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(1, keepdims=True))
  loss = float(np.mean(-(np.exp(logp) * logp).sum(1)))           # tent.py L45 (.mean(0))
  t = ref["t"] + 1

  def adam(path, p, g, m, v):                                     # torch.optim.Adam, wd 0
    if not _trained(path):                                        # requires_grad False
      return p, m, v
    m = B1 * m + (1 - B1) * g
    v = B2 * v + (1 - B2) * g * g
    m_hat, v_hat = m / (1 - B1 ** t), v / (1 - B2 ** t)
    return p - LR * m_hat / (np.sqrt(v_hat) + EPS), m, v

  out = jax.tree_util.tree_map_with_path(adam, ref["params"], grad, ref["m"], ref["v"])
  pick = lambda i: jax.tree_util.tree_map(lambda o: o[i], out,
                                          is_leaf=lambda o: isinstance(o, tuple))
  new = dict(t=t, params=pick(0), m=pick(1), v=pick(2),
             stats=ref_lib.torch_bn_running_stats(ref["stats"], jax.device_get(bn_inputs)))
  return new, types.SimpleNamespace(loss=loss, grad=grad)


# ------------------------------------------------------------------------------------------------
# the test

def _adam_first_moments(opt_state):
  """{param path: Adam's first moment} over every group of the port's optimiser state."""
  out = {}
  adam_states = jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
  for s in adam_states:
    if isinstance(s, optax.ScaleByAdamState):
      for path, mu in jax.tree_util.tree_leaves_with_path(s.mu):
        out[jax.tree_util.keystr(path)] = np.asarray(mu, np.float64)
  return out


# The ViT step is in the fast tier; the ResNet's (BN throughout the backbone) compiles for longer.
@pytest.mark.parametrize("backbone", [pytest.param("resnet", marks=pytest.mark.slow), "vit"])
def test_two_tent_steps_match_the_authors(backbone):
  config = _config(backbone)
  model = _model(backbone)
  rs = np.random.RandomState(3)
  variables = random_variables(model, rs, SIZE)
  mesh = parallel.create_mesh(jax.devices()[:1])
  built = train_adapt.build(config, mesh, variables, N)
  assert built.method.views == ("test",)      # the un-augmented image, as the authors' batches
  state0 = jax.device_get(built.state)

  perm = rs.permutation(N)
  batches = [ref_lib.image_batch(rs, perm[i * B:(i + 1) * B], SIZE, C) for i in range(2)]
  out, m1 = built.step(built.state, parallel.shard_batch(batches[0], mesh))
  state1 = jax.device_get(out)
  state2, m2 = jax.device_get(built.step(out, parallel.shard_batch(batches[1], mesh)))

  src = ref_lib.float64_tree(state0.params)
  zeros = jax.tree_util.tree_map(np.zeros_like, src)
  ref1, info1 = _ref_step(model, dict(t=0, params=src, m=zeros, v=zeros,
                                      stats=ref_lib.float64_tree(state0.batch_stats)),
                          batches[0]["image"], config)
  # Step 2 of the reference starts from the port's state after step 1 (checked below against
  # step 1 of the reference) with the reference's Adam moments: see NOISE.
  ref2, info2 = _ref_step(model, dict(ref1, params=ref_lib.float64_tree(state1.params),
                                      stats=ref_lib.float64_tree(state1.batch_stats)),
                          batches[1]["image"], config)

  trained = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(src)
             if _trained(p)]
  assert len(trained) == (34 if backbone == "resnet" else 10), trained
  # The loss (the port reports the pre-update loss of each step's forward).
  assert float(m1["train/loss"]) == pytest.approx(info1.loss, rel=1e-5)
  assert float(m2["train/loss"]) == pytest.approx(info2.loss, rel=1e-5)

  # The gradient of every trained parameter: Adam's first moment after one step is (1 - b1) g.
  moments = _adam_first_moments(state1.opt_state)
  assert sorted(moments) == sorted(trained)
  for name in trained:
    assert_trees_close(moments[name] / (1 - B1), _leaf(info1.grad, name), what=f"grad {name}")

  undetermined = {}
  for got, want, prev, t in ((state1, ref1, state0, 1), (state2, ref2, state1, 2)):
    for path, p in jax.tree_util.tree_leaves_with_path(got.params):
      name = jax.tree_util.keystr(path)
      old = np.float64(_leaf(prev.params, path))
      if not _trained(path):    # frozen: bit-identical, whatever the optimiser
        np.testing.assert_array_equal(p, old, err_msg=f"step {t}: {name} moved")
        continue
      # The update itself (about lr sign(g) at step 1), at a tolerance far below lr, where the
      # gradient is above float32 noise in both steps.
      update, want_update = np.float64(p) - old, _leaf(want["params"], name) - old
      ok = np.minimum(np.abs(_leaf(info1.grad, name)), np.abs(_leaf(info2.grad, name))) > NOISE
      np.testing.assert_allclose(update[ok], want_update[ok], rtol=2e-3, atol=2e-6,
                                 err_msg=f"step {t}: update of {name}")
      assert np.all(np.abs(update) <= LR * (1 + 3e-3) + 1e-6), name   # Adam: <= ~lr a step
      if t == 1 and not ok.all():
        undetermined[name] = int(np.sum(~ok))
    assert_trees_close(got.batch_stats, want["stats"], what=f"step {t}: batch_stats ")
  # On the ViT the final LayerNorm's bias: a shift of the one token the head reads, which the
  # head's batch-statistics BN removes again (its gradient is zero, up to float32 noise); else
  # a few entries (a ReLU closed over the whole batch, a gradient that happens to be tiny).
  if backbone == "vit":
    assert undetermined.pop("['backbone']['Transformer']['encoder_norm']['bias']") == 64
  total = sum(_leaf(src, name).size for name in trained)
  assert sum(undetermined.values()) <= 0.01 * total, undetermined


def _leaf(tree, path):
  """The leaf of a params tree at a key path (or its `keystr`)."""
  if isinstance(path, str):
    path = re.findall(r"\['([^']+)'\]", path)
  return np.asarray(ref_lib.at_path(tree, path))
