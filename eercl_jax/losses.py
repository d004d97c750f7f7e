"""Losses and label maths of the adaptation stage (docs/method.md#adaptation-stage).

Pure functions, jnp in and out, no state. Every function is jittable with static shapes.
Small matmuls use HIGHEST precision: they cost nothing at C = 7, and the default GPU precision
(TF32) would perturb cosine similarities and argmax/argmin ties.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def _mm(a, b):
  return jnp.matmul(a, b, precision=HIGHEST)


def l2_normalize(x, eps: float = 1e-12, axis: int = -1):
  """PyTorch F.normalize: x / max(||x||, eps).

  Written as sqrt(max(||x||^2, eps^2)) (the same number) so the gradient stays finite at x = 0
  and zero rows stay exactly zero.
  """
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x / jnp.sqrt(jnp.maximum(sq, jnp.asarray(eps, x.dtype) ** 2))


# ------------------------------------------------------------------------------------------------
# class relation (2.7)

def relation_matrix(class_directions, off_diagonal: float = 1.0):
  """(C, D) weight-norm directions v -> S (C, C): 1 on the diagonal, alpha*cos(v_i, v_j) off it."""
  v = l2_normalize(class_directions)
  r = _mm(v, v.T)
  eye = jnp.eye(r.shape[0], dtype=bool)
  # The diagonal is set to exactly 1 (not the rounded cos(v_i, v_i)), as the original's I + (1-I)*R.
  return jnp.where(eye, jnp.ones_like(r), off_diagonal * r)


def relation_similarity(p, q, relation):
  """sim_S(p_i, q_j) = p_i^T S q_j for all pairs: (B1,C),(B2,C),(C,C) -> (B1,B2).

  Two small matmuls instead of the original's B1 x B2 x C x C tensor
  (docs/toolchain.md#relation-similarity-as-two-small-matmuls).
  """
  return _mm(_mm(p, relation), q.T)


# ------------------------------------------------------------------------------------------------
# AaD baseline (2.8)

def aad_loss(probs, neighbour_probs):
  """(attract, disperse) of AaD on the global batch; gradient only through `probs`.

  probs: (B, C) online weak softmax. neighbour_probs: (B, K, C) bank scores of the K neighbours.
  attract = (1/B) sum_ikc s (log s - P): the original passes probabilities (not log-probs) as
  kl_div's input, so the "KL" is linear in P. xlogy makes 0*log 0 = 0 (a negative randn score,
  faithful init, gives NaN in the value as in recent PyTorch, while the gradient stays -s).
  disperse = (1/B) sum_{i != j} <P_i, P_j>. The 1/W and lambda weights belong to the caller.
  """
  b = probs.shape[0]
  s = jax.lax.stop_gradient(neighbour_probs)
  const = jnp.sum(jax.scipy.special.xlogy(s, s))
  attract = (const - jnp.sum(s * probs[:, None, :])) / b
  gram = _mm(probs, probs.T)
  off = jnp.where(jnp.eye(b, dtype=bool), jnp.zeros_like(gram), gram)
  disperse = jnp.sum(off) / b
  return attract, disperse


# ------------------------------------------------------------------------------------------------
# contrastive terms (2.9, 2.10)

def _cross_entropy_int(logits, labels):
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
  return logz - picked


def class_contrast(probs, labels, mask, relation, temperature):
  """Class-contrastive loss: logits_c = (S p)_c / T, CE to the cluster label, masked mean over B.

  Masked-out rows count as zeros in the mean (the original's mean of mask * CE).
  """
  relation = jax.lax.stop_gradient(relation)
  labels = jax.lax.stop_gradient(labels)
  mask = jax.lax.stop_gradient(mask).astype(probs.dtype)
  logits = _mm(probs, relation.T) / temperature  # (S p)_c for every row
  return jnp.mean(mask * _cross_entropy_int(logits, labels))


def instance_nce(query, key, negatives, relation, temperature):
  """Relation-weighted InfoNCE: 0.5 * mean_i CE([pos_i, neg_i.] / T, 0).

  pos_i = 0.5 q_i^T S k_i, neg_ij = 0.5 q_i^T S m_j; key and negatives are constants.
  """
  relation = jax.lax.stop_gradient(relation)
  key = jax.lax.stop_gradient(key)
  negatives = jax.lax.stop_gradient(negatives)
  qs = _mm(query, relation)
  pos = 0.5 * jnp.sum(qs * key, axis=-1, keepdims=True)
  neg = 0.5 * _mm(qs, negatives.T)
  logits = jnp.concatenate([pos, neg], axis=1) / temperature
  zeros = jnp.zeros((query.shape[0],), jnp.int32)
  return 0.5 * jnp.mean(_cross_entropy_int(logits, zeros))


# ------------------------------------------------------------------------------------------------
# clustering (2.6) and cluster labels

def cluster_prototypes(features, probs, threshold: int = 0, rounds: int = 2, valid=None):
  """SHOT-style weighted k-means with cosine distance -> (labels (N,) int32, prototypes (C, D)).

  Round 1 uses the soft scores as affinities, later rounds the one-hot of the previous labels.
  The labelset restriction (classes with more than `threshold` members in the current hard
  labels) is a +inf mask on the distances, so shapes stay static. Prototypes are the normalised
  centroids of the last round (the hard means of the second-to-last assignment); an empty class
  gives a zero prototype. Memory is O(N*(D+C)): no N x N. `valid` (N,) bool excludes rows (the
  padding of a bank sharded over devices) from centroids and class counts.
  """
  n, c = probs.shape
  keep = jnp.ones((n,), jnp.float32) if valid is None else valid.astype(jnp.float32)
  feats = l2_normalize(features.astype(jnp.float32))
  pred = jnp.argmax(probs, axis=1).astype(jnp.int32)
  aff = probs.astype(jnp.float32) * keep[:, None]
  centroids = None
  for _ in range(rounds):
    centroids = _mm(aff.T, feats) / (1e-8 + jnp.sum(aff, axis=0)[:, None])
    counts = jnp.sum(jax.nn.one_hot(pred, c, dtype=jnp.int32) * keep[:, None].astype(jnp.int32),
                     axis=0)
    in_labelset = counts > threshold
    # cdist 'cosine' = 1 - u.v / (|u||v|); |F_i| = 1 already.
    dist = 1.0 - _mm(feats, l2_normalize(centroids).T)
    dist = jnp.where(in_labelset[None, :], dist, jnp.inf)
    pred = jnp.argmin(dist, axis=1).astype(jnp.int32)  # first index on ties, like numpy
    aff = jax.nn.one_hot(pred, c, dtype=jnp.float32) * keep[:, None]
  return pred, l2_normalize(centroids)


def batch_cluster_labels(features, prototypes):
  """argmax_c <normalize(f_i), normalize(P_c)> (first index on ties; zero prototypes score 0)."""
  sims = _mm(l2_normalize(features), l2_normalize(prototypes).T)
  return jnp.argmax(sims, axis=1).astype(jnp.int32)


# ------------------------------------------------------------------------------------------------
# misc

def label_smoothing_cross_entropy(logits, labels, smoothing: float = 0.1):
  """PyTorch label smoothing: q = (1-eps)*onehot + eps/C, loss = -mean_i sum_c q log softmax."""
  c = logits.shape[-1]
  logp = jax.nn.log_softmax(logits, axis=-1)
  q = (1.0 - smoothing) * jax.nn.one_hot(labels, c, dtype=logp.dtype) + smoothing / c
  return -jnp.mean(jnp.sum(q * logp, axis=-1))


def confidence_mask(teacher_probs, threshold):
  """Bool (B,): the teacher's max probability reaches the threshold (0.95 in the FER config)."""
  return jnp.max(teacher_probs, axis=-1) >= threshold
