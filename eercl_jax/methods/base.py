"""What every source-free adaptation method shares on the adaptation loop (train_adapt.py).

A method is a plug-in: the loop restores the source model, owns the input stream, the
checkpoints, the evaluations and the resume; the method says

  views            which views of each target image its step sees ('weak', 'strong', 'test');
  teacher          whether the state carries an EMA teacher (params and BN statistics);
  frozen_groups /  which parameters it trains: optimiser groups left untouched, and a finer
  trainable        mask inside the trained groups (Tent: the normalisation layers' affine only);
  init_banks       the state it adds (banks, pseudo-labels: a pytree, or None);
  step             one jitted step: (state, batch) -> (state, metrics) - pure maths;
  refresh          what it does on a full pass over the target list, and when (`refresh_every`
                   steps, or only before the first step): bank refills, clustering, BN statistics;
  log_keys/ratios  the names it logs.

The state (`AdaptState`) is one pytree that orbax saves whole, so every method resumes exactly.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from eercl_jax import logs, parallel
from eercl_jax.data import pipelines


@flax.struct.dataclass
class AdaptState:
  step: jax.Array
  params: Any                      # the online network
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  teacher_params: Any = None       # an EMA teacher (methods with `teacher`)
  teacher_batch_stats: Any = None  # drifts through the teacher's own train-mode forwards
  banks: Any = None                # the method's own state: banks, pseudo-labels, ...


@dataclasses.dataclass(frozen=True)
class StepContext:
  """What a method's step reads besides the state and the batch, fixed for a run."""
  model: Any                       # the Flax model (models.eercl.EERCLModel)
  tx: Any                          # the optax optimiser
  norm: pipelines.Normalization    # uint8 images -> normalised float32, on the device
  bn_group_size: int               # BN statistics over fixed groups of this many rows
  num_steps: int                   # the run's length (decay schedules)
  num_images: int                  # target images: the real rows of an N-row bank
  mesh: Any = None


@dataclasses.dataclass(frozen=True)
class RefreshContext:
  """What a refresh reads besides the state: the eval forward, where the state lives, and how
  the target list is read (view, batch, the randomness of a random view)."""
  evaluator: Any                   # evaluation.Evaluator: the eval-mode forward
  shardings: Any                   # AdaptState of shardings
  batch_size: int
  seed: int
  # The original EERCL's drop_last refresh coverage: None, or (W, per-device batch)
  faithful_rows: Optional[tuple[int, int]] = None

  @property
  def mesh(self):
    return self.evaluator.mesh

  def batches(self, target_list, view: str, refresh_index: int, resident=None,
              desc: str = "refresh") -> Iterator[tuple[dict, Any]]:
    """(sharded batch with index/label/valid, its images on the device) of one pass over the
    target list in `view`; a padded row is valid=False. `resident` (data/resident.py): the
    list held in memory, read with no decode."""
    keep = None
    if self.faithful_rows is not None:
      keep = faithful_refresh_rows(len(target_list), *self.faithful_rows, self.seed,
                                   refresh_index)
    if resident is not None:
      host_batches = resident.batches(view, self.batch_size, self.seed, refresh_index)
    else:
      host_batches = self.evaluator.loader.eval(target_list, view, self.batch_size,
                                                seed=self.seed, epoch=refresh_index)
    total = -(-len(target_list) // self.batch_size)
    for host in logs.tty_progress(host_batches, total, f"{desc} {refresh_index}"):
      if keep is not None:
        host = dict(host, valid=host["valid"] & keep[host["index"]])
      b = parallel.shard_batch(host, self.mesh)
      images = (b["image"] if resident is None
                else resident.images(b, view, self.seed, refresh_index))
      yield b, images


def faithful_refresh_rows(n: int, w: int, b: int, seed: int, refresh_index: int) -> np.ndarray:
  """The original EERCL's drop_last refresh coverage (docs/deviations.md#bank-refresh-coverage):
  each of W virtual devices walks its share of a shuffled list in batches of B and drops its
  final partial batch."""
  per = -(-n // w)
  written = w * b * (per // b)
  order = np.random.default_rng([seed, refresh_index]).permutation(n)
  keep = np.zeros(n, bool)
  keep[order[:written]] = True
  return keep


def forward(model, params, batch_stats, x, *, groups: int, rng, train: bool = True,
            use_dropout: Optional[bool] = None):
  """(features, logits, new batch statistics) of `model` on normalised images `x`: train mode
  normalises with batch statistics over `groups` fixed groups and updates the running ones;
  dropout follows `train` unless `use_dropout` says otherwise."""
  (feat, logits), new = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                    train=train, bn_groups=groups, use_dropout=use_dropout,
                                    rngs={"dropout": rng}, mutable=["batch_stats"])
  return feat, logits, new["batch_stats"]


def entropy(probs, eps: float = 0.0):
  """Per-row -sum_c p log(p + eps) (eps = 0: xlogy, 0 log 0 = 0)."""
  if eps:
    return -jnp.sum(probs * jnp.log(probs + eps), axis=-1)
  return -jnp.sum(jax.scipy.special.xlogy(probs, probs), axis=-1)


class Method:
  """A source-free adaptation method; subclasses set the class attributes and override what
  they do differently (see the module docstring)."""
  name: str = ""
  paper: str = ""
  views: tuple[str, ...] = ("weak",)
  teacher: bool = False
  refresh_view: Optional[str] = None   # None: the method has no full pass over the target
  refresh_every: int = 0               # steps between refreshes; 0: only before the first step
  refresh_with_teacher: bool = False   # its first refresh also embeds with the teacher
  refresh_name: str = "refresh"        # what the log calls the refresh
  log_keys: tuple = (("train/loss", "loss", ".4f"),)
  ratios: dict = {}

  def __init__(self, config):
    self.config = config

  # ---------------------------------------------------------------------------- parameters

  def frozen_groups(self) -> tuple[str, ...]:
    """Optimiser groups (models.eercl.PARAM_GROUPS) that get neither updates nor decay."""
    return ()

  def trainable(self, params) -> Any:
    """A bool pytree over `params` (False: no update, no decay), or None: every parameter of
    the groups that are not frozen."""
    return None

  # --------------------------------------------------------------------------------- state

  def init_banks(self, rng, num_images: int, params, mesh) -> Any:
    """The method's own initial state (a pytree, or None)."""
    return None

  def bank_shardings(self, banks, mesh) -> Any:
    """Where each part of the method's state lives (default: replicated)."""
    rep = parallel.replicated(mesh)
    return jax.tree_util.tree_map(lambda _: rep, banks)

  # ---------------------------------------------------------------------------------- step

  def step(self, state: AdaptState, batch: dict, ctx: StepContext):
    """One adaptation step: (state, sharded batch) -> (state, metrics); pure, jitted."""
    raise NotImplementedError

  def refresh_due(self, it_index: int) -> bool:
    """Is a refresh due before the step of the original's iteration `it_index` (0-based)?"""
    if self.refresh_view is None:
      return False
    if self.refresh_every <= 0:
      return it_index == 0
    return it_index % self.refresh_every == 0

  def refresh(self, state: AdaptState, target_list, refresh_index: int, ctx: RefreshContext, *,
              with_teacher: bool, resident=None) -> tuple[AdaptState, dict]:
    """The full pass over the target list; returns the state and scalars to log."""
    raise NotImplementedError(f"{self.name} has no refresh")

  # --------------------------------------------------------------------------- optimiser

  @staticmethod
  def apply_gradients(state: AdaptState, grads, tx) -> tuple[Any, Any]:
    """(new params, new optimiser state) of one optimiser step."""
    import optax  # pylint: disable=import-outside-toplevel
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return optax.apply_updates(state.params, updates), opt_state


Registry = dict[str, Callable[..., Method]]
