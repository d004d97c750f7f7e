"""Source-only: the source model evaluated on the target, not adapted - the row every table of a
domain-adaptation paper starts with. The loop runs its steps without touching the model (no
forward, no gradient), so every evaluation scores the source model."""
from __future__ import annotations

import jax.numpy as jnp

from eercl_jax.methods import base


class Method(base.Method):
  name = "source_only"
  paper = "the source model without adaptation"

  def step(self, state, batch, ctx):
    del batch, ctx
    return state.replace(step=state.step + 1), {"train/loss": jnp.zeros((), jnp.float32)}
