"""orbax checkpoints of a whole run: the training state pytree, the data-iterator state and metadata.

`<workdir>/checkpoints/` holds the latest checkpoints (resume), `<workdir>/best/` the single
best one by the stage's selection rule. Each checkpoint has three items:
  state  - the train-state pytree (params, batch stats, optimiser state, banks, step, rng),
  data   - JSON: the input pipeline's iterator state,
  meta   - JSON: model config, class names, metrics at save time (checked when restoring).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

ITEMS = ("state", "data", "meta")


def _manager(directory: str, max_to_keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=ITEMS)


class RunCheckpoints:
  """Latest (for resuming) and best (by the selection metric) checkpoints of one run."""

  def __init__(self, workdir: str, keep: int = 4, best_name: str = "best"):
    self.latest = _manager(os.path.join(workdir, "checkpoints"), keep)
    self.best = _manager(os.path.join(workdir, best_name), 1)

  def save(self, step: int, state: Any, data_state: dict, meta: dict, best: bool = False) -> None:
    manager = self.best if best else self.latest
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state),
                              meta=ocp.args.JsonSave(meta))
    manager.save(step, args=args, force=True)
    manager.wait_until_finished()

  def latest_step(self):
    return self.latest.latest_step()

  def restore_latest(self, abstract_state: Any):
    """Returns (state, data_state, meta) of the latest checkpoint, or None if there is none."""
    step = self.latest.latest_step()
    if step is None:
      return None
    return restore(self.latest, step, abstract_state)

  def close(self):
    self.latest.close()
    self.best.close()


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any):
  args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                            data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
  out = manager.restore(step, args=args)
  return out["state"], out["data"], out["meta"]


def read_meta(directory: str) -> tuple[int, dict]:
  """Latest step and metadata of a checkpoint directory (a `checkpoints/` or `best/` folder)."""
  manager = _manager(directory, 1)
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"no orbax checkpoint found in {directory!r}")
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  manager.close()
  return step, meta


def restore_subtree(directory: str, abstract_subtree: dict, step: int | None = None) -> dict:
  """Restores some top-level entries of a checkpoint's `state` item (e.g. only `params` and
  `batch_stats` of a source run) into the shapes, dtypes and shardings of `abstract_subtree`."""
  manager = _manager(directory, 1)
  step = manager.latest_step() if step is None else step
  restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_subtree)
  out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=abstract_subtree, restore_args=restore_args, partial_restore=True)))
  manager.close()
  return out["state"]


def abstract_like(tree: Any) -> Any:
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)
