"""eercl_jax.losses against small cases worked out with numpy loops (docs/method.md)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eercl_jax import losses as L


def _softmax(x, axis=-1):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def _probs(rs, *shape):
  return _softmax(rs.randn(*shape) * 2.0).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# normalisation, relation

def test_l2_normalize_torch_semantics():
  x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-14, 0.0]], np.float32)
  got = np.asarray(jax.jit(L.l2_normalize)(jnp.asarray(x)))
  want = np.empty_like(x)
  for i, row in enumerate(x):
    want[i] = row / max(np.sqrt((row.astype(np.float64) ** 2).sum()), 1e-12)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
  assert np.all(got[1] == 0)
  g = jax.jit(jax.grad(lambda v: L.l2_normalize(v).sum()))(jnp.zeros((2, 3)))
  assert np.all(np.isfinite(np.asarray(g)))


def test_relation_matrix_properties():
  rs = np.random.RandomState(0)
  v = rs.randn(7, 16).astype(np.float32) * rs.rand(7, 1).astype(np.float32) * 5
  s = np.asarray(L.relation_matrix(jnp.asarray(v)))
  vh = v / np.linalg.norm(v, axis=1, keepdims=True)
  want = np.zeros((7, 7))
  for i in range(7):
    for j in range(7):
      want[i, j] = 1.0 if i == j else float(vh[i] @ vh[j])
  np.testing.assert_allclose(s, want, atol=1e-6)
  np.testing.assert_array_equal(s, s.T)
  np.testing.assert_array_equal(np.diag(s), np.ones(7, np.float32))
  np.testing.assert_allclose(s, vh @ vh.T, atol=1e-6)  # alpha = 1: S = V_hat V_hat^T
  s_half = np.asarray(L.relation_matrix(jnp.asarray(v), off_diagonal=0.5))
  off = ~np.eye(7, dtype=bool)
  np.testing.assert_allclose(s_half[off], 0.5 * s[off], atol=1e-7)
  np.testing.assert_array_equal(np.diag(s_half), np.ones(7, np.float32))


def test_relation_similarity_quadruple_loop():
  rs = np.random.RandomState(1)
  p, q = _probs(rs, 5, 4), _probs(rs, 3, 4)
  s = rs.randn(4, 4).astype(np.float32)  # deliberately asymmetric: checks the orientation too
  want = np.zeros((5, 3))
  for a in range(5):
    for b in range(3):
      for j in range(4):
        for l in range(4):
          want[a, b] += p[a, j] * s[j, l] * q[b, l]
  got = np.asarray(L.relation_similarity(jnp.asarray(p), jnp.asarray(q), jnp.asarray(s)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# AaD

def _aad_loops(p, s):
  b, k, c = s.shape
  att = 0.0
  for i in range(b):
    for kk in range(k):
      for cc in range(c):
        x = float(s[i, kk, cc])
        att += (0.0 if x == 0 else x * np.log(x)) - x * float(p[i, cc])
  dis = 0.0
  for i in range(b):
    for j in range(b):
      if i != j:
        dis += float(p[i] @ p[j])
  return att / b, dis / b


def test_aad_loss_values_and_xlogy():
  rs = np.random.RandomState(2)
  p = _probs(rs, 6, 5)
  s = _probs(rs, 6, 3, 5)
  s[0, 0] = [1.0, 0.0, 0.0, 0.0, 0.0]  # 0*log 0 terms must be 0, not NaN
  s[2, 1] = [0.0, 0.5, 0.5, 0.0, 0.0]
  att, dis = jax.jit(L.aad_loss)(jnp.asarray(p), jnp.asarray(s))
  want_att, want_dis = _aad_loops(p, s)
  assert np.isfinite(float(att))
  np.testing.assert_allclose(float(att), want_att, rtol=1e-5)
  np.testing.assert_allclose(float(dis), want_dis, rtol=1e-5)


def test_aad_loss_gradients():
  rs = np.random.RandomState(3)
  b, k, c = 6, 4, 7
  p = _probs(rs, b, c)
  s = _probs(rs, b, k, c)
  g_att, g_dis = jax.jit(lambda x, y: (jax.grad(lambda z: L.aad_loss(z, y)[0])(x),
                                        jax.grad(lambda z: L.aad_loss(z, y)[1])(x)))(
      jnp.asarray(p), jnp.asarray(s))
  want_att = np.zeros((b, c))
  want_dis = np.zeros((b, c))
  for i in range(b):
    for kk in range(k):
      want_att[i] -= s[i, kk] / b
    for j in range(b):
      if j != i:
        want_dis[i] += 2.0 * p[j] / b  # P_i appears in the (i,j) and (j,i) terms
  np.testing.assert_allclose(np.asarray(g_att), want_att, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(g_dis), want_dis, rtol=1e-5, atol=1e-7)
  g_s = jax.jit(jax.grad(lambda y, x: sum(L.aad_loss(x, y))))(jnp.asarray(s), jnp.asarray(p))
  np.testing.assert_array_equal(np.asarray(g_s), 0.0)


def test_aad_loss_negative_scores_nan_value_finite_grad():
  # Faithful randn bank rows (docs/deviations.md#bank-refresh-coverage): the value is NaN (log of
  # a negative), the gradient is -s/B.
  s = jnp.asarray(np.array([[[-0.5, 1.5]]], np.float32))
  p = jnp.asarray(np.array([[0.3, 0.7]], np.float32))
  assert np.isnan(float(jax.jit(L.aad_loss)(p, s)[0]))
  g = jax.jit(jax.grad(lambda x, y: L.aad_loss(x, y)[0]))(p, s)
  np.testing.assert_allclose(np.asarray(g), [[0.5, -1.5]])


# ------------------------------------------------------------------------------------------------
# contrastive terms

def test_class_contrast_loop_mask_and_grads():
  rs = np.random.RandomState(4)
  b, c, t = 6, 5, 0.07
  p = _probs(rs, b, c)
  y = rs.randint(0, c, b).astype(np.int32)
  mask = np.array([1, 0, 1, 1, 0, 1], bool)
  v = rs.randn(c, 8)
  vh = v / np.linalg.norm(v, axis=1, keepdims=True)
  s = (vh @ vh.T).astype(np.float32)
  np.fill_diagonal(s, 1.0)
  total = 0.0
  for i in range(b):
    logits = [sum(s[cc, j] * p[i, j] for j in range(c)) / t for cc in range(c)]
    m = max(logits)
    ce = m + np.log(sum(np.exp(z - m) for z in logits)) - logits[y[i]]
    total += ce if mask[i] else 0.0
  want = total / b  # masked rows count in the denominator
  crc = jax.jit(L.class_contrast, static_argnums=4)
  for mk in (mask, mask.astype(np.float32)):
    got = crc(jnp.asarray(p), jnp.asarray(y), jnp.asarray(mk),
                                    jnp.asarray(s), t)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
  gp, gm, gs = jax.jit(jax.grad(L.class_contrast, argnums=(0, 2, 3)), static_argnums=4)(
      jnp.asarray(p), jnp.asarray(y), jnp.asarray(mask.astype(np.float32)), jnp.asarray(s), t)
  np.testing.assert_array_equal(np.asarray(gs), 0.0)
  np.testing.assert_array_equal(np.asarray(gm), 0.0)
  gp = np.asarray(gp)
  assert np.all(gp[~mask] == 0) and np.any(gp[mask] != 0)


def test_instance_nce_loop_and_grads():
  rs = np.random.RandomState(5)
  b, m, c, t = 4, 9, 5, 0.07
  q, k, neg = _probs(rs, b, c), _probs(rs, b, c), _probs(rs, m, c)
  s = rs.randn(c, c).astype(np.float32)
  s = (s + s.T) / 4
  np.fill_diagonal(s, 1.0)
  total = 0.0
  for i in range(b):
    logits = [0.5 * float(q[i] @ s @ k[i]) / t]
    for j in range(m):
      logits.append(0.5 * float(q[i] @ s @ neg[j]) / t)
    mx = max(logits)
    total += mx + np.log(sum(np.exp(z - mx) for z in logits)) - logits[0]
  want = 0.5 * total / b
  args = tuple(jnp.asarray(a) for a in (q, k, neg, s)) + (t,)
  np.testing.assert_allclose(float(jax.jit(L.instance_nce, static_argnums=4)(*args)),
                             want, rtol=1e-5)
  grads = jax.jit(jax.grad(L.instance_nce, argnums=(0, 1, 2, 3)), static_argnums=4)(*args)
  assert np.any(np.asarray(grads[0]) != 0)
  for g in grads[1:]:
    np.testing.assert_array_equal(np.asarray(g), 0.0)


# ------------------------------------------------------------------------------------------------
# clustering

def _shot_reference(feat, probs, threshold, rounds):
  """SHOT's obtain_label loop (cosine, no bias column) with an explicit labelset, in float64."""
  n, k = probs.shape
  f = feat.astype(np.float64)
  f = f / np.linalg.norm(f, axis=1, keepdims=True)
  predict = probs.argmax(1)
  aff = probs.astype(np.float64)
  for _ in range(rounds):
    initc = aff.T @ f / (1e-8 + aff.sum(0)[:, None])
    cls_count = np.eye(k)[predict].sum(0)
    labelset = np.where(cls_count > threshold)[0]
    dd = np.zeros((n, len(labelset)))
    for i in range(n):
      for jj, cl in enumerate(labelset):
        cvec = initc[cl]
        dd[i, jj] = 1.0 - f[i] @ cvec / (np.linalg.norm(f[i]) * np.linalg.norm(cvec))
    predict = labelset[dd.argmin(1)]
    aff = np.eye(k)[predict]
  norms = np.maximum(np.linalg.norm(initc, axis=1, keepdims=True), 1e-12)
  return predict, initc / norms


def _cluster_data(seed, n=120, c=5, d=8, never=()):
  rs = np.random.RandomState(seed)
  centres = rs.randn(c, d) * 2
  y = rs.randint(0, c, n)
  feat = (centres[y] + rs.randn(n, d)).astype(np.float32)
  logits = rs.randn(n, c) + 2.0 * np.eye(c)[y]
  for cl in never:  # this class is never the argmax -> outside the round-1 labelset
    logits[:, cl] -= 10.0
  return feat, _softmax(logits).astype(np.float32)


@pytest.mark.parametrize("rounds,threshold,never", [(2, 0, ()), (2, 0, (3,)), (3, 0, ()),
                                                    (2, 20, ())])
def test_cluster_prototypes_vs_shot_loop(rounds, threshold, never):
  feat, probs = _cluster_data(10 + rounds + threshold, never=never)
  want_lab, want_proto = _shot_reference(feat, probs, threshold, rounds)
  lab, proto = jax.jit(L.cluster_prototypes, static_argnames=("threshold", "rounds"))(
      jnp.asarray(feat), jnp.asarray(probs), threshold=threshold, rounds=rounds)
  np.testing.assert_array_equal(np.asarray(lab), want_lab)
  np.testing.assert_allclose(np.asarray(proto), want_proto, atol=2e-6)
  for cl in never:  # empty in pred1 -> zero prototype, never a label
    np.testing.assert_array_equal(np.asarray(proto)[cl], 0.0)
    assert not np.any(np.asarray(lab) == cl)


def test_cluster_prototypes_labelset_excludes_small_class():
  # With threshold 10 class 2 (8 argmax members) is too small to be a target.
  feat, probs = _cluster_data(25, n=60)
  counts = np.bincount(probs.argmax(1), minlength=5)
  small = np.where(counts <= 10)[0]
  assert list(small) == [2]
  lab, proto = jax.jit(L.cluster_prototypes, static_argnames=("threshold",))(
      jnp.asarray(feat), jnp.asarray(probs), threshold=10)
  want, want_proto = _shot_reference(feat, probs, 10, 2)
  np.testing.assert_allclose(np.asarray(proto), want_proto, atol=2e-6)
  np.testing.assert_array_equal(np.asarray(proto)[2], 0.0)
  np.testing.assert_array_equal(np.asarray(lab), want)
  # excluded in round 1 -> absent from pred1 -> excluded again in round 2
  assert not np.isin(np.asarray(lab), small).any()


def test_batch_cluster_labels_ties_and_zero_prototype():
  protos = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 3.0], [1.0, 0.0]], np.float32)
  feats = np.array([[5.0, 0.0], [0.0, -1.0], [1.0, 1.0], [-1.0, -1e-3]], np.float32)
  want = []
  for f in feats:
    fn = f / np.linalg.norm(f)
    sims = [0.0 if not p.any() else fn @ (p / np.linalg.norm(p)) for p in protos]
    best = 0
    for j, v in enumerate(sims):  # first index wins ties
      if v > sims[best]:
        best = j
    want.append(best)
  got = np.asarray(jax.jit(L.batch_cluster_labels)(jnp.asarray(feats), jnp.asarray(protos)))
  np.testing.assert_array_equal(got, want)
  assert list(got) == [1, 0, 1, 0]  # tie 1 vs 3 -> 1; all-negative row -> zero prototype 0


# ------------------------------------------------------------------------------------------------
# misc

def test_label_smoothing_cross_entropy():
  rs = np.random.RandomState(6)
  z = rs.randn(5, 7).astype(np.float32) * 3
  y = rs.randint(0, 7, 5)
  eps = 0.1
  total = 0.0
  for i in range(5):
    lse = np.log(np.exp(z[i].astype(np.float64)).sum())
    for cc in range(7):
      qv = (1 - eps) * (cc == y[i]) + eps / 7
      total -= qv * (z[i, cc] - lse)
  lsce = jax.jit(L.label_smoothing_cross_entropy, static_argnums=2)
  got = lsce(jnp.asarray(z), jnp.asarray(y), eps)
  np.testing.assert_allclose(float(got), total / 5, rtol=1e-5)
  got0 = lsce(jnp.asarray(z), jnp.asarray(y), 0.0)
  ce = np.mean([np.log(np.exp(z[i].astype(np.float64)).sum()) - z[i, y[i]] for i in range(5)])
  np.testing.assert_allclose(float(got0), ce, rtol=1e-5)


def test_confidence_mask():
  p = jnp.asarray(np.array([[0.95, 0.05], [0.9, 0.1], [0.02, 0.98]], np.float32))
  np.testing.assert_array_equal(np.asarray(jax.jit(L.confidence_mask)(p, 0.95)),
                                [True, False, True])


def test_cluster_prototypes_ignores_invalid_padding_rows():
  rng = np.random.default_rng(3)
  feats = rng.normal(size=(30, 5)).astype(np.float32)
  probs = rng.dirichlet(np.ones(4), size=30).astype(np.float32)
  labels, protos = L.cluster_prototypes(jnp.asarray(feats), jnp.asarray(probs))
  # Padding rows (as in a bank sharded over devices) with garbage that would change the result.
  pad_f = np.concatenate([feats, 50 * rng.normal(size=(6, 5)).astype(np.float32)])
  pad_p = np.concatenate([probs, np.tile(np.eye(4, dtype=np.float32)[:1], (6, 1))])
  valid = np.arange(36) < 30
  labels_p, protos_p = L.cluster_prototypes(jnp.asarray(pad_f), jnp.asarray(pad_p),
                                                 valid=jnp.asarray(valid))
  np.testing.assert_array_equal(np.asarray(labels_p)[:30], np.asarray(labels))
  np.testing.assert_allclose(np.asarray(protos_p), np.asarray(protos), rtol=1e-5, atol=1e-6)
  _, protos_bad = L.cluster_prototypes(jnp.asarray(pad_f), jnp.asarray(pad_p))
  assert not np.allclose(np.asarray(protos_bad), np.asarray(protos))
