"""The feature and score banks NRC and AaD keep: the L2-normalised features and the softmax
predictions of every target image, filled by an eval-mode pass over the target list before the
first step (the authors' bank initialisation, on their training loader's random view) and
overwritten row by row with each training batch's outputs before the neighbours are looked up."""
from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp

from eercl_jax import losses


@flax.struct.dataclass
class Banks:
  feat: jax.Array      # (N, D) L2-normalised features
  score: jax.Array     # (N, C) softmax predictions


def init(num_images: int, feat_dim: int, num_classes: int) -> Banks:
  """Zero banks; the first refresh writes every row."""
  return Banks(feat=jnp.zeros((num_images, feat_dim), jnp.float32),
               score=jnp.zeros((num_images, num_classes), jnp.float32))


@functools.partial(jax.jit, donate_argnums=0)
def write(banks: Banks, idx, valid, feat, score) -> Banks:
  """Rows `idx` <- (feat, score); rows with valid=False (padding) are dropped."""
  idx = jnp.where(valid, idx, banks.feat.shape[0])
  return banks.replace(feat=banks.feat.at[idx].set(feat, mode="drop"),
                       score=banks.score.at[idx].set(score, mode="drop"))


def update(banks: Banks, idx, feat, probs) -> Banks:
  """The training batch's rows, before the neighbour query (detached): L2-normalised features
  and probabilities."""
  feat = jax.lax.stop_gradient(losses.l2_normalize(feat))
  probs = jax.lax.stop_gradient(probs)
  return banks.replace(feat=banks.feat.at[idx].set(feat), score=banks.score.at[idx].set(probs))


def fill(method, state, target_list, refresh_index, ctx, resident=None):
  """The bank initialisation pass: eval-mode embeddings of every target image in the method's
  refresh view."""
  banks = state.banks
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  for b, images in ctx.batches(target_list, method.refresh_view, refresh_index, resident,
                               "bank fill"):
    feat, score = ctx.evaluator.embed(variables, images)
    banks = write(banks, b["index"], b["valid"], feat, score)
  banks = jax.device_put(banks, ctx.shardings.banks)
  truth = jnp.asarray(target_list.labels)           # monitoring only
  stats = {"refresh/argmax_acc": float(jnp.mean(jnp.argmax(banks.score, -1) == truth))}
  return state.replace(banks=banks), stats
