"""`config.model.dtype='bfloat16'` computes in bfloat16 and keeps float32 everywhere else.

bfloat16 against float32, from the same float32 state and the same batches (tiny ViT, 16 px):
three source steps and two adaptation steps, their losses (every term the adaptation logs),
the parameter updates, and the refresh embedding that fills the banks. Tolerances (also in
docs/toolchain.md#mixed-precision), beside the largest differences measured on this tiny model
(bfloat16 keeps 8 significant bits, ~0.4% per rounding):

  each loss term                |bf16 - f32| <= 0.03 * max(1, |f32|)      measured <= 0.005
  parameter change after steps  ||d_bf16 - d_f32|| <= 0.2 * ||d_f32||      measured 0.07-0.13
  refresh features              cosine(bf16, f32) >= 0.999 per image      measured 0.99998
  refresh scores                |bf16 - f32| <= 1e-3                      measured 4e-6

(the parameter changes differ most: a random tiny network's gradients are sums of cancelling
terms, whose relative rounding error is large; BN groups of 16 rows, as smaller groups of
near-identical random features amplify it further). Every parameter, optimiser state, BN
statistic and bank stays float32.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo_adapt, demo_source
from eercl_jax import config_defaults, losses, parallel, train_adapt, train_source
from eercl_jax.models import eercl

pytestmark = pytest.mark.slow   # an end-to-end run: not in the fast tier


SIZE, B, N = 16, 16, 40       # image side, batch, target images
LOSS_TOL, UPDATE_TOL, COS_MIN, SCORE_TOL = 0.03, 0.2, 0.999, 1e-3


def _shrink(c, dtype):
  c = config_defaults.runlocal(c)
  c.model.dtype = dtype
  c.model.dropout = 0.0
  c.data.resize = c.data.crop = SIZE
  c.batch_size, c.bn_group_size = B, B
  return c


def _batches(steps, views, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(steps):
    b = {k: rng.integers(0, 256, (B, SIZE, SIZE, 3), np.uint8) for k in views}
    b["label"] = rng.integers(0, 7, B).astype(np.int32)
    b["index"] = rng.permutation(N)[:B].astype(np.int32)
    out.append(b)
  return out


def _float_leaves(tree):
  return [(jax.tree_util.keystr(p), x.dtype) for p, x in
          jax.tree_util.tree_flatten_with_path(tree)[0]
          if jnp.issubdtype(x.dtype, jnp.inexact)]


def _assert_float32(tree, what):
  leaves = _float_leaves(tree)
  assert leaves, what
  bad = [(p, d) for p, d in leaves if d != jnp.float32]
  assert not bad, f"{what}: not float32: {bad[:5]}"


def _close_losses(got, want, keys):
  for k in keys:
    g, w = float(got[k]), float(want[k])
    assert abs(g - w) <= LOSS_TOL * max(1.0, abs(w)), f"{k}: bf16 {g} vs f32 {w}"


def _update_error(new_bf, new_f32, old):
  d_bf = jax.tree_util.tree_map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b), new_bf,
                                old)
  d_32 = jax.tree_util.tree_map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b), new_f32,
                                old)
  diff = sum(np.sum((a - b) ** 2) for a, b in zip(jax.tree_util.tree_leaves(d_bf),
                                                  jax.tree_util.tree_leaves(d_32)))
  ref = sum(np.sum(b ** 2) for b in jax.tree_util.tree_leaves(d_32))
  return float(np.sqrt(diff / ref))


@pytest.fixture(scope="module")
def mesh():
  return parallel.create_mesh(jax.devices()[:1])


def test_source_steps_agree_and_state_stays_float32(mesh):
  configs = {d: _shrink(demo_source.get_config(), d) for d in ("float32", "bfloat16")}
  init = jax.device_get(train_source.build(configs["float32"], mesh).state)
  batches = _batches(3, ("image",))
  results = {}
  for dtype, c in configs.items():
    built = train_source.build(c, mesh, variables={"params": init.params,
                                                   "batch_stats": init.batch_stats})
    state = built.state
    losses = []
    for b in batches:
      state, m = built.step(state, parallel.shard_batch(b, mesh))
      losses.append(jax.device_get(m))
    results[dtype] = (jax.device_get(state), losses)
  (s_bf, l_bf), (s_32, l_32) = results["bfloat16"], results["float32"]
  for got, want in zip(l_bf, l_32):
    _close_losses(got, want, ["train/loss"])
  assert _update_error(s_bf.params, s_32.params, init.params) <= UPDATE_TOL
  for name in ("params", "opt_state", "batch_stats"):
    _assert_float32(getattr(s_bf, name), f"source {name}")


def test_adaptation_steps_and_refresh_agree_and_banks_stay_float32(mesh):
  configs = {d: _shrink(demo_adapt.get_config(), d) for d in ("float32", "bfloat16")}
  c32 = configs["float32"]
  variables = jax.device_get(eercl.init_variables(eercl.create_model(c32.model),
                                                  jax.random.PRNGKey(1), SIZE))
  batches = _batches(2, ("weak", "strong1", "strong2"), seed=1)
  keys = ["train/loss", "train/aad_attract", "train/aad_disperse", "train/class_contrast",
          "train/instance_nce"]
  results, embeds = {}, {}
  for dtype, c in configs.items():
    built = train_adapt.build(c, mesh, variables, N)
    state = built.state
    # The refresh's embedding of a batch (what the banks store).
    embeds[dtype] = jax.device_get(built.evaluator.embed(
        {"params": state.params, "batch_stats": state.batch_stats}, batches[0]["weak"]))
    init_params = jax.device_get(state.params)
    metrics = []
    for b in batches:
      state, m = built.step(state, parallel.shard_batch(b, mesh))
      metrics.append(jax.device_get(m))
    results[dtype] = (jax.device_get(state), metrics)
  (s_bf, m_bf), (s_32, m_32) = results["bfloat16"], results["float32"]
  for got, want in zip(m_bf, m_32):
    _close_losses(got, want, keys)
  assert _update_error(s_bf.params, s_32.params, init_params) <= UPDATE_TOL
  for name in ("params", "opt_state", "batch_stats", "teacher_params", "teacher_batch_stats",
               "banks"):
    _assert_float32(getattr(s_bf, name), f"adaptation {name}")
  (f_bf, p_bf), (f_32, p_32) = embeds["bfloat16"], embeds["float32"]
  assert f_bf.dtype == p_bf.dtype == jnp.float32
  cos = np.sum(f_bf * f_32, -1) / (np.linalg.norm(f_bf, axis=-1) * np.linalg.norm(f_32, axis=-1))
  assert cos.min() >= COS_MIN, cos
  assert np.max(np.abs(p_bf - p_32)) <= SCORE_TOL
  # The bf16 model really computes in bf16 (else this test would compare float32 to itself).
  assert not np.array_equal(f_bf, f_32)
  # A random network is never confident enough for the class contrast's mask (0.95), so that
  # term is 0 in both steps above: here it is on the embedded probabilities, every row in, with
  # the same labels (a bf16 rounding may flip an argmax label, a discrete change, not a loss's).
  relation = s_32.banks.relation
  labels = np.argmax(p_32, -1)
  mask = np.ones(len(labels), bool)
  got, want = (float(losses.class_contrast(p, labels, mask, relation, 0.07))
               for p in (p_bf, p_32))
  assert abs(got - want) <= LOSS_TOL * max(1.0, abs(want)), (got, want)
