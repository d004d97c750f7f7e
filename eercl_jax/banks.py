"""The adaptation stage's banks (docs/method.md#adaptation-banks) as device arrays, with pure
functions on them.

Banks are a pytree; every update returns a new one, so the whole training step can be jitted with
the banks donated. By default the banks are replicated (3.2); `sharded_knn` and
`sharded_aad_neighbour_probs` serve banks sharded by rows over a mesh axis, for targets whose N
makes a replicated N x 256 bank or an N-wide similarity row too large for one device.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

HIGHEST = jax.lax.Precision.HIGHEST


@flax.struct.dataclass
class Banks:
  aad_feat: jax.Array        # (N, D) teacher weak features, L2-normalised: AaD neighbours
  aad_score: jax.Array       # (N, C) teacher weak softmax: AaD neighbour scores
  feat: jax.Array            # (N, D) online features of the last refresh: clustering
  score: jax.Array           # (N, C) online softmax of the last refresh: clustering
  label: jax.Array           # (N,) int32 ground truth, logging only (never feed to a loss)
  prototypes: jax.Array      # (C, D) normalised cluster centroids
  relation: jax.Array        # (C, C) class relation matrix S
  neg_weak: jax.Array        # (M, C) ring of teacher weak probs
  neg_strong: jax.Array      # (M, C) ring of teacher strong-1 probs
  neg_weak_ptr: jax.Array    # () int32
  neg_strong_ptr: jax.Array  # () int32


# The fields with one row per target image (sharded by rows with config.adapt.shard_banks).
ROW_BANKS = ("aad_feat", "aad_score", "feat", "score", "label")


def init_banks(rng, num_images: int, feat_dim: int, num_classes: int, neg_size: int = 512,
               faithful_init: bool = True, zero_negatives: bool = False) -> Banks:
  """Initial banks. faithful_init: randn N-row banks as the original
  (docs/deviations.md#bank-refresh-coverage); otherwise zeros, which is safe on the default path
  because the full-coverage refresh at step 0 writes every row. Prototypes are randn in both
  modes (overwritten by the first clustering), negatives randn unless zero_negatives
  (docs/deviations.md#negative-bank-initialisation). The relation starts as the identity until
  computed from the classifier."""
  n, d, c, m = num_images, feat_dim, num_classes, neg_size
  ks = jax.random.split(rng, 7)
  if faithful_init:
    nrow = lambda k, shape: jax.random.normal(k, shape, jnp.float32)
  else:
    nrow = lambda k, shape: jnp.zeros(shape, jnp.float32)
  if zero_negatives:
    neg = lambda k: jnp.zeros((m, c), jnp.float32)
  else:
    neg = lambda k: jax.random.normal(k, (m, c), jnp.float32)
  return Banks(
      aad_feat=nrow(ks[0], (n, d)), aad_score=nrow(ks[1], (n, c)),
      feat=nrow(ks[2], (n, d)), score=nrow(ks[3], (n, c)),
      label=jnp.zeros((n,), jnp.int32),
      prototypes=jax.random.normal(ks[4], (c, d), jnp.float32),
      relation=jnp.eye(c, dtype=jnp.float32),
      neg_weak=neg(ks[5]), neg_strong=neg(ks[6]),
      neg_weak_ptr=jnp.zeros((), jnp.int32), neg_strong_ptr=jnp.zeros((), jnp.int32))


# ------------------------------------------------------------------------------------------------
# writes

def scatter_rows(bank, idx, values):
  """bank[idx] = values (duplicate indices: unspecified winner, as in PyTorch)."""
  return bank.at[idx].set(values.astype(bank.dtype))


def ring_push(bank, ptr, values):
  """The original's ring buffer (2.11): write values[0:end-start] at [ptr, end),
  end = min(ptr+B, M); the pointer wraps to 0 exactly when end == M, else advances by B. Rows
  past M are dropped (not wrapped). Works with a traced ptr: the scatter drops out-of-range rows."""
  m, b = bank.shape[0], values.shape[0]
  ptr = jnp.asarray(ptr, jnp.int32)
  rows = ptr + jnp.arange(b, dtype=jnp.int32)  # unique and sorted; rows >= M are dropped
  bank = bank.at[rows].set(values.astype(bank.dtype), mode="drop",
                           unique_indices=True, indices_are_sorted=True)
  new_ptr = jnp.where(ptr + b >= m, jnp.int32(0), ptr + b)
  return bank, new_ptr


def update_negative_banks(banks: Banks, weak_probs, strong_probs) -> Banks:
  """After the optimiser step: teacher weak / strong-1 probs of the global batch into the rings."""
  neg_weak, pw = ring_push(banks.neg_weak, banks.neg_weak_ptr, weak_probs)
  neg_strong, ps = ring_push(banks.neg_strong, banks.neg_strong_ptr, strong_probs)
  return banks.replace(neg_weak=neg_weak, neg_weak_ptr=pw, neg_strong=neg_strong,
                       neg_strong_ptr=ps)


def update_aad_banks(banks: Banks, idx, feats, probs) -> Banks:
  """Per-step AaD bank write (before the loss). `feats` are written as given: pass the already
  L2-normalised teacher features, the very vectors used as kNN queries, so each query's own row
  holds exactly its query and is its top-1 (self) neighbour."""
  return banks.replace(aad_feat=scatter_rows(banks.aad_feat, idx, feats),
                       aad_score=scatter_rows(banks.aad_score, idx, probs))


# ------------------------------------------------------------------------------------------------
# nearest neighbours, replicated bank

def _barrier(x):
  # On CPU XLA fuses top_k indices into a following gather as a pathological loop (~50x slower
  # at N ~ 1e5); the barrier keeps them apart
  # (docs/toolchain.md#top_k-then-gather-the-optimization-barrier).
  return jax.lax.optimization_barrier(x)


def knn(queries, bank, k: int):
  """Top-k of queries @ bank.T -> (values (B,k), indices (B,k) int32).

  lax.top_k is stable: equal similarities come out lowest index first (pinned by a test)."""
  sims = jnp.matmul(queries, bank.T, precision=HIGHEST)
  values, idx = jax.lax.top_k(sims, k)
  return values, _barrier(idx)


def aad_neighbour_probs(queries, feat_bank, score_bank, k: int):
  """Scores (B,k,C) of the k nearest bank rows, the first of the top k+1 (self) dropped (2.8)."""
  _, idx = knn(queries, feat_bank, k + 1)
  return jnp.take(score_bank, idx[:, 1:], axis=0)


# ------------------------------------------------------------------------------------------------
# nearest neighbours, bank sharded by rows

def pad_rows(n: int, num_shards: int) -> int:
  """Smallest multiple of num_shards >= n: the row count of a bank to be sharded over num_shards."""
  return -(-n // num_shards) * num_shards


def pad_bank(bank, num_shards: int):
  """Zero rows appended up to pad_rows; pass num_valid = the original N to the sharded kNN."""
  extra = pad_rows(bank.shape[0], num_shards) - bank.shape[0]
  return jnp.pad(bank, ((0, extra),) + ((0, 0),) * (bank.ndim - 1))


def bank_sharding(mesh, axis: str = "data") -> NamedSharding:
  """Row sharding of an N-row bank over `axis`."""
  return NamedSharding(mesh, P(axis))


def _to_specs(mesh, args, specs):
  # Explicit-axis meshes (jax.make_mesh's default) need inputs already laid out as in_specs;
  # Auto-axis meshes let shard_map reshard by itself (jax.reshard rejects Auto axes).
  if all(t == AxisType.Explicit for t in mesh.axis_types):
    return tuple(jax.reshard(a, NamedSharding(mesh, s)) for a, s in zip(args, specs))
  return args


def _sharded_topk(queries, bank, k, mesh, axis, num_valid, extra=None):
  """Shared body: local top-k per shard (global row ids, padded rows at -inf), all-gather of the
  candidates, second top-k. Candidates are concatenated in shard order and each shard's list is
  lowest-index-first among ties, so the stable merge picks the lowest global index on ties, the
  same answer as `knn`. `extra` (N, ...) is a row-sharded array whose candidate rows are carried
  along and returned for the winners."""
  n = bank.shape[0]
  shards = mesh.shape[axis]
  if n % shards:
    raise ValueError(f"bank rows {n} not divisible by {shards} shards; use pad_bank/pad_rows")
  n_local = n // shards
  k_local = min(k, n_local)
  if k > n:
    raise ValueError(f"k={k} > bank rows {n}")
  num_valid = jnp.asarray(n if num_valid is None else num_valid, jnp.int32)
  has_extra = extra is not None

  def local(q, b, nv, *ex):
    start = jax.lax.axis_index(axis).astype(jnp.int32) * n_local
    sims = jnp.matmul(q, b.T, precision=HIGHEST)
    rows = start + jnp.arange(n_local, dtype=jnp.int32)
    sims = jnp.where(rows[None, :] < nv, sims, -jnp.inf)
    vals, li = jax.lax.top_k(sims, k_local)
    li = _barrier(li)
    gi = li + start
    cand_v = jax.lax.all_gather(vals, axis, axis=1, tiled=True)   # (B, shards*k_local)
    cand_i = jax.lax.all_gather(gi, axis, axis=1, tiled=True)
    top_v, pos = jax.lax.top_k(cand_v, k)
    pos = _barrier(pos)
    out = (top_v, jnp.take_along_axis(cand_i, pos, axis=1))
    if has_extra:
      ev = jnp.take(ex[0], li, axis=0)                              # (B, k_local, ...)
      cand_e = jax.lax.all_gather(ev, axis, axis=1, tiled=True)
      out += (jnp.take_along_axis(cand_e, pos.reshape(pos.shape + (1,) * (ev.ndim - 2)), axis=1),)
    return out

  row_spec = P(axis)
  in_specs = (P(), row_spec, P()) + ((row_spec,) if has_extra else ())
  args = (queries, bank, num_valid) + ((extra,) if has_extra else ())
  args = _to_specs(mesh, args, in_specs)
  out_specs = (P(), P()) + ((P(),) if has_extra else ())
  # check_vma=False: the merged result is replicated (every shard merges the same gathered
  # candidates) but all_gather's output is typed as varying, which the checker would reject.
  return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)(*args)


def sharded_knn(queries, bank, k: int, mesh, axis: str = "data", num_valid=None):
  """`knn` over a bank sharded by rows on mesh axis `axis` (rows divisible by the axis size).

  num_valid: rows >= num_valid (padding from pad_bank) never win. Same values and indices as
  `knn` on the unpadded bank, ties included."""
  vals, idx = _sharded_topk(queries, bank, k, mesh, axis, num_valid)
  return vals, idx


def sharded_aad_neighbour_probs(queries, feat_bank, score_bank, k: int, mesh, axis: str = "data",
                                num_valid=None):
  """`aad_neighbour_probs` with both banks sharded by rows: each shard carries its candidates'
  scores along with the local top-k, so no N-wide gather or one-hot is needed."""
  _, _, scores = _sharded_topk(queries, feat_bank, k + 1, mesh, axis, num_valid, extra=score_bank)
  return scores[:, 1:]
