"""Model selection without target labels: scores of the target predictions that an adaptation
run logs at every evaluation, and keeps a checkpoint by, beside the oracle (target accuracy,
which uses target labels) and the last step (docs/method.md#label-free-model-selection).

  im   information maximisation: H(mean_i p_i) - mean_i H(p_i), the entropy of the mean
       prediction (diversity) minus the mean entropy of the predictions (confidence); higher is
       better - the negative of SHOT's loss, as pytorch-adapt's IM validator
  snd  soft neighbourhood density (Saito et al., "Tune it the right way: unsupervised validation
       of domain adaptation via soft neighborhood density", ICCV 2021), as its authors' code:
       the predictions L2-normalised, their similarity matrix over 0.05 with each image's own
       similarity set to -1/0.05, a row-wise softmax, and the mean entropy of its rows (1e-5
       inside the log); higher is better

Both take the (N, C) softmax predictions of the whole target list (the test view, eval mode).
SND's N x N matrix is computed in blocks of rows, so its memory is O(block x N).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from eercl_jax import losses

# Rules that need no target label; the oracle rule is the target list's accuracy.
LABEL_FREE = ("im", "snd")
SND_TEMPERATURE = 0.05
_EPS = 1e-5
_BLOCK = 1024


def im_score(probs, eps: float = _EPS) -> float:
  """H(mean p) - mean H(p) of (N, C) probabilities, eps inside the logs."""
  p = jnp.asarray(probs, jnp.float32)
  m = jnp.mean(p, 0)
  diversity = -jnp.sum(m * jnp.log(m + eps))
  confidence = jnp.mean(-jnp.sum(p * jnp.log(p + eps), -1))
  return float(diversity - confidence)


@functools.partial(jax.jit, static_argnames=("temperature", "block"))
def _snd(probs, temperature: float, block: int):
  n = probs.shape[0]
  f = losses.l2_normalize(probs)
  pad = -(-n // block) * block - n
  rows = jnp.pad(f, ((0, pad), (0, 0))).reshape(-1, block, f.shape[-1])
  starts = jnp.arange(rows.shape[0]) * block

  def one(args):
    q, start = args
    sims = jnp.matmul(q, f.T, precision=losses.HIGHEST) / temperature      # (block, N)
    own = (start + jnp.arange(block))[:, None] == jnp.arange(n)[None, :]
    sims = jnp.where(own, -1.0 / temperature, sims)
    soft = jax.nn.softmax(sims, -1)
    ent = -jnp.sum(soft * jnp.log(soft + _EPS), -1)
    return jnp.where(start + jnp.arange(block) < n, ent, 0.0)

  return jnp.sum(jax.lax.map(one, (rows, starts))) / n


def snd_score(probs, temperature: float = SND_TEMPERATURE, block: int = _BLOCK) -> float:
  """The soft neighbourhood density of (N, C) probabilities (see the module docstring)."""
  return float(_snd(jnp.asarray(probs, jnp.float32), temperature, min(block, len(probs))))


def scores(probs: np.ndarray) -> dict[str, float]:
  """{'im', 'snd'} of the target list's (N, C) predictions."""
  return {"im": im_score(probs), "snd": snd_score(probs)}
