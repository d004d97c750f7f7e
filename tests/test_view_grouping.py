"""The row layout of the adaptation step's three views and the teacher's shuffle-BN.

The original ran plain BN per GPU on the concatenation [s1; s2; w] of that GPU's own images;
`eercl_method.group_views` must put exactly those rows into BN group g, `ungroup_views` must
undo it, and `teacher_forward` must hand back its outputs in the input's row order after
normalising a shuffled batch (docs/method.md#adaptation-shuffle-bn-for-the-teacher).
All arrays hold distinct integers, so any mix-up of rows, views or groups shows exactly.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eercl_jax.methods import eercl as eercl_method

B = 8   # rows per view


def _views(trailing=(2, 3)):
  """s1, s2, w: (B, *trailing) with every entry distinct across the three views."""
  n = int(np.prod(trailing))
  return [np.arange(v * B * n, (v + 1) * B * n, dtype=np.float32).reshape((B,) + trailing)
          for v in range(3)]


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_group_g_is_the_per_gpu_concat_of_its_rows_of_each_view(groups):
  s1, s2, w = _views()
  got = np.asarray(eercl_method.group_views([jnp.asarray(v) for v in (s1, s2, w)], groups))
  b = B // groups
  want = np.concatenate([np.concatenate([v[g * b:(g + 1) * b] for v in (s1, s2, w)])
                         for g in range(groups)])
  assert got.shape == (3 * B, 2, 3)
  np.testing.assert_array_equal(got, want)
  # And back: group g's [s1_g; s2_g; w_g] -> the three views in their original row order.
  back = np.asarray(eercl_method.ungroup_views(jnp.asarray(want), groups))
  np.testing.assert_array_equal(back, np.stack([s1, s2, w]))


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_ungroup_inverts_group(groups):
  views = _views(trailing=(5,))                 # (B, F) outputs, as the step ungroups them
  grouped = eercl_method.group_views([jnp.asarray(v) for v in views], groups)
  s1, s2, w = np.asarray(eercl_method.ungroup_views(grouped, groups))
  for got, want in zip((s1, s2, w), views):
    np.testing.assert_array_equal(got, want)


class _RowModule(nn.Module):
  """A stand-in for the network with the same call signature: `feat` is a per-row function of
  the input, and `logits` records which BN group each row position fell into, so the test sees
  both the un-shuffle and that the groups were formed from the shuffled batch."""

  @nn.compact
  def __call__(self, x, *, train, bn_groups=1):
    assert train
    calls = self.variable("batch_stats", "calls", lambda: jnp.zeros((), jnp.int32))
    calls.value += 1
    kernel = self.param("kernel", nn.initializers.zeros, (x.shape[-1], 2))
    feat = x @ kernel
    rows = x.shape[0] // bn_groups
    group = (jnp.arange(x.shape[0]) // rows).astype(jnp.float32)
    return feat, jnp.broadcast_to(group[:, None], (x.shape[0], 3))


def test_teacher_forward_returns_rows_in_input_order():
  n, groups = 12, 3
  x = jnp.asarray(np.arange(n * 4, dtype=np.float32).reshape(n, 4))
  kernel = jnp.asarray(np.arange(8, dtype=np.float32).reshape(4, 2) - 3)   # small integers
  perm_rng = jax.random.PRNGKey(5)
  # The same draw `teacher_forward` makes: a permutation that is neither the identity nor its
  # own inverse (else feat[perm] and feat[argsort(perm)] could not be told apart).
  perm = np.asarray(jax.random.permutation(perm_rng, n))
  assert (perm != np.arange(n)).any() and (perm[perm] != np.arange(n)).any()

  feat, logits, stats = eercl_method.teacher_forward(
      _RowModule(), {"kernel": kernel}, {"calls": jnp.zeros((), jnp.int32)}, x, groups,
      perm_rng, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(np.asarray(feat), np.asarray(x @ kernel))
  # Row i sat at position argsort(perm)[i] of the shuffled batch, hence in that position's group.
  where = np.argsort(perm)
  np.testing.assert_array_equal(np.asarray(logits)[:, 0], where // (n // groups))
  assert (where // (n // groups) != np.arange(n) // (n // groups)).any()   # groups were mixed
  assert int(stats["calls"]) == 1
