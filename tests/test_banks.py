"""eercl_jax.banks: ring buffer and kNN (replicated, row-sharded) vs python/numpy references."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from eercl_jax import banks as bk


# ------------------------------------------------------------------------------------------------
# init and writes

def test_init_banks_shapes_and_modes():
  n, d, c, m = 10, 6, 7, 16
  init = jax.jit(bk.init_banks, static_argnums=(1, 2, 3),
                 static_argnames=("neg_size", "faithful_init", "zero_negatives"))
  b = init(jax.random.PRNGKey(0), n, d, c, neg_size=m)
  shapes = dict(aad_feat=(n, d), aad_score=(n, c), feat=(n, d), score=(n, c), label=(n,),
                prototypes=(c, d), relation=(c, c), neg_weak=(m, c), neg_strong=(m, c),
                neg_weak_ptr=(), neg_strong_ptr=())
  for name, shape in shapes.items():
    assert getattr(b, name).shape == shape, name
  assert b.label.dtype == jnp.int32 and b.neg_weak_ptr.dtype == jnp.int32
  assert len(jax.tree.leaves(b)) == 11  # a pytree: jit/donate as one argument
  for name in ("aad_feat", "aad_score", "feat", "score", "prototypes", "neg_weak", "neg_strong"):
    assert float(jnp.std(getattr(b, name))) > 0.5, name  # randn, as the original
  z = init(jax.random.PRNGKey(0), n, d, c, neg_size=m, faithful_init=False, zero_negatives=True)
  for name in ("aad_feat", "aad_score", "feat", "score", "neg_weak", "neg_strong"):
    assert not np.any(np.asarray(getattr(z, name))), name
  assert float(jnp.std(z.prototypes)) > 0.5


def test_scatter_rows_and_update_aad_banks():
  b = bk.init_banks(jax.random.PRNGKey(1), 8, 3, 2, neg_size=4, faithful_init=False)
  idx = jnp.array([5, 1])
  feats = jnp.arange(6, dtype=jnp.float32).reshape(2, 3)
  probs = jnp.array([[0.2, 0.8], [0.6, 0.4]])
  nb = jax.jit(bk.update_aad_banks)(b, idx, feats, probs)
  want = np.zeros((8, 3), np.float32)
  want[5], want[1] = [0, 1, 2], [3, 4, 5]
  np.testing.assert_array_equal(np.asarray(nb.aad_feat), want)
  np.testing.assert_allclose(np.asarray(nb.aad_score)[[5, 1]], probs)
  np.testing.assert_array_equal(np.asarray(nb.feat), 0.0)  # other banks untouched


def _ring_reference(bank, ptr, values):
  """The original's update, line by line (docs/method.md#adaptation-negative-rings)."""
  bank = bank.copy()
  m, b = bank.shape[0], values.shape[0]
  start = ptr
  end = min(start + b, m)
  bank[start:end] = values[0:end - start]
  ptr = 0 if end == m else ptr + b
  return bank, ptr


@pytest.mark.parametrize("b,m,steps", [(64, 512, 10), (48, 100, 7), (7, 5, 3)])
def test_ring_push_matches_original(b, m, steps):
  rs = np.random.RandomState(b)
  push = jax.jit(bk.ring_push)  # ptr is traced
  bank_j, ptr_j = jnp.asarray(rs.randn(m, 3).astype(np.float32)), jnp.int32(0)
  bank_r, ptr_r = np.asarray(bank_j).copy(), 0
  ptrs = [0]
  for _ in range(steps):
    vals = rs.randn(b, 3).astype(np.float32)
    bank_j, ptr_j = push(bank_j, ptr_j, jnp.asarray(vals))
    bank_r, ptr_r = _ring_reference(bank_r, ptr_r, vals)
    assert int(ptr_j) == ptr_r
    np.testing.assert_array_equal(np.asarray(bank_j), bank_r)
    ptrs.append(ptr_r)
  if (b, m) == (64, 512):
    assert ptrs == [0, 64, 128, 192, 256, 320, 384, 448, 0, 64, 128]
  if (b, m) == (48, 100):
    assert ptrs == [0, 48, 96, 0, 48, 96, 0, 48]


def test_update_negative_banks_independent_pointers():
  b = bk.init_banks(jax.random.PRNGKey(2), 4, 3, 2, neg_size=8, zero_negatives=True)
  b = b.replace(neg_strong_ptr=jnp.int32(6))
  w = jnp.ones((4, 2))
  s = 2 * jnp.ones((4, 2))
  nb = jax.jit(bk.update_negative_banks)(b, w, s)
  assert int(nb.neg_weak_ptr) == 4 and int(nb.neg_strong_ptr) == 0
  np.testing.assert_array_equal(np.asarray(nb.neg_weak)[:, 0], [1, 1, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(np.asarray(nb.neg_strong)[:, 0], [0, 0, 0, 0, 0, 0, 2, 2])


# ------------------------------------------------------------------------------------------------
# kNN

def test_lax_top_k_is_stable():
  # knn's tie rule rests on this: equal values come out lowest index first.
  v, i = jax.lax.top_k(jnp.array([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0, 3.0]]), 5)
  np.testing.assert_array_equal(np.asarray(i), [[1, 2, 4, 6, 3]])


def _tied_data(seed, b, n, d=4):
  # entries in {-2,-1,1,2}: dot products are exact small integers with many ties
  rs = np.random.RandomState(seed)
  vals = np.array([-2.0, -1.0, 1.0, 2.0], np.float32)
  return vals[rs.randint(0, 4, (b, d))], vals[rs.randint(0, 4, (n, d))]


def _numpy_knn(q, bank, k):
  sims = np.zeros((q.shape[0], bank.shape[0]))
  for i in range(q.shape[0]):
    for j in range(bank.shape[0]):
      sims[i, j] = float(q[i] @ bank[j])
  idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # stable: lowest index first on ties
  return np.take_along_axis(sims, idx, axis=1), idx


def test_knn_ties_vs_numpy():
  q, bank = _tied_data(0, 6, 50)
  v, i = jax.jit(bk.knn, static_argnums=2)(jnp.asarray(q), jnp.asarray(bank), 7)
  wv, wi = _numpy_knn(q, bank, 7)
  np.testing.assert_array_equal(np.asarray(i), wi)
  np.testing.assert_array_equal(np.asarray(v), wv)
  assert i.dtype == jnp.int32


def test_aad_neighbour_probs_drops_self():
  rs = np.random.RandomState(3)
  n, d, c, k = 40, 8, 5, 4
  feat = rs.randn(n, d).astype(np.float32)
  feat /= np.linalg.norm(feat, axis=1, keepdims=True)
  score = rs.rand(n, c).astype(np.float32)
  idx = np.array([3, 17, 39])
  out = jax.jit(bk.aad_neighbour_probs, static_argnums=3)(
      jnp.asarray(feat[idx]), jnp.asarray(feat), jnp.asarray(score), k)
  assert out.shape == (3, k, c)
  for r, i in enumerate(idx):
    sims = [float(feat[i] @ feat[j]) for j in range(n)]
    order = sorted(range(n), key=lambda j: (-sims[j], j))
    assert order[0] == i  # self is the top-1 ...
    np.testing.assert_array_equal(np.asarray(out[r]), score[order[1:k + 1]])  # ... and dropped


# ------------------------------------------------------------------------------------------------
# sharded kNN on the 8 fake CPU devices of conftest

def _mesh(axis_type):
  if jax.device_count() < 8:
    pytest.skip("needs the 8 fake CPU devices of tests/conftest.py")
  return jax.make_mesh((8,), ("data",), axis_types=(axis_type,))


def test_pad_rows_and_pad_bank():
  assert bk.pad_rows(37, 8) == 40 and bk.pad_rows(40, 8) == 40 and bk.pad_rows(1, 8) == 8
  p = bk.pad_bank(jnp.ones((37, 3)), 8)
  assert p.shape == (40, 3) and not np.any(np.asarray(p[37:]))


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
@pytest.mark.parametrize("n,k", [(64, 5), (37, 7)])  # 37: padded to 40, k > 5 rows per shard
def test_sharded_knn_equals_knn(axis_type, n, k):
  mesh = _mesh(axis_type)
  q, bank = _tied_data(n, 6, n)
  ref_v, ref_i = bk.knn(jnp.asarray(q), jnp.asarray(bank), k)
  padded = np.array(bk.pad_bank(jnp.asarray(bank), 8))
  padded[n:] = 100.0  # padded rows would win every query if they were not masked
  f = jax.jit(functools.partial(bk.sharded_knn, k=k, mesh=mesh))
  v, i = f(jnp.asarray(q), jnp.asarray(padded), num_valid=jnp.int32(n))  # traced num_valid
  np.testing.assert_array_equal(np.asarray(i), np.asarray(ref_i))
  np.testing.assert_array_equal(np.asarray(v), np.asarray(ref_v))
  wv, wi = _numpy_knn(q, bank, k)
  np.testing.assert_array_equal(np.asarray(i), wi)


def test_sharded_aad_neighbour_probs_equals_unsharded():
  mesh = _mesh(AxisType.Explicit)
  rs = np.random.RandomState(7)
  n, c, k = 45, 7, 4
  q, feat = _tied_data(8, 10, n)
  q[:3] = feat[[0, 20, 44]]  # some queries are bank rows (the AaD case)
  score = rs.rand(n, c).astype(np.float32)
  ref = bk.aad_neighbour_probs(jnp.asarray(q), jnp.asarray(feat), jnp.asarray(score), k)
  f = jax.jit(functools.partial(bk.sharded_aad_neighbour_probs, k=k, mesh=mesh, num_valid=n))
  got = f(jnp.asarray(q), bk.pad_bank(jnp.asarray(feat), 8), bk.pad_bank(jnp.asarray(score), 8))
  assert got.shape == (10, k, c)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


def test_sharded_knn_rejects_indivisible_bank():
  mesh = _mesh(AxisType.Explicit)
  with pytest.raises(ValueError, match="pad_bank"):
    bk.sharded_knn(jnp.ones((2, 3)), jnp.ones((37, 3)), 2, mesh)
