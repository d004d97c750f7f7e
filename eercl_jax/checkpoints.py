"""orbax checkpoints of a whole run: the training state pytree, the data-iterator state and metadata.

`<workdir>/checkpoints/` holds the latest checkpoints (resume), `<workdir>/best/` the single
best one by the stage's selection rule. Each checkpoint has three items:
  state  - the train-state pytree (params, batch stats, optimiser state, banks, step, rng),
  data   - JSON: the input pipeline's iterator state,
  meta   - JSON: model config, class names, metrics at save time (checked when restoring).

A step folder (`checkpoints/<step>/`, `best/<step>/`) whose files cannot be read (truncated,
damaged) raises `UnreadableCheckpoint`, a CheckpointError naming the folder: the commands print
it as one line; a resuming run falls back to its previous step (run.Run.resume).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any, Iterator, Sequence

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from eercl_jax.errors import CheckpointError, ConfigError, UserError

ITEMS = ("state", "data", "meta")


class UnreadableCheckpoint(CheckpointError):
  """A step folder whose files orbax cannot read (`folder`: the step folder, `cause`: orbax's or
  TensorStore's error in a few words)."""

  def __init__(self, folder: str, step: int, cause: str):
    self.folder, self.step, self.cause = folder, step, cause
    super().__init__(f"checkpoint folder {folder} (step {step}) is unreadable ({cause}): a "
                     "truncated or damaged file; restore the folder from a copy, or delete it "
                     "to use another checkpoint")


def cause(e: BaseException) -> str:
  """An exception in a few words: its type and the start of its message's first line
  (TensorStore's messages run to pages)."""
  first = (str(e).strip().splitlines() or [""])[0]
  return f"{type(e).__name__}: {first[:200]}"


def step_folder(directory: str, step: int) -> str:
  """The folder of one step of an orbax checkpoint folder."""
  return os.path.join(os.path.abspath(directory), str(step))


def _quiet_aborted_reads() -> None:
  """After a failed restore, TensorStore's reads still in flight complete onto orbax's asyncio
  loop, already closed: each prints a bare 'RuntimeError: Event loop is closed' traceback
  (through sys.unraisablehook), before, after or amid the one-line error. Those, and only
  those, are dropped once a checkpoint is read; every other unraisable exception goes to the
  hook in place before."""
  previous = sys.unraisablehook
  if getattr(previous, "eercl_quiet_aborted_reads", False):
    return

  def hook(unraisable) -> None:
    if not (unraisable.exc_type is RuntimeError
            and str(unraisable.exc_value) == "Event loop is closed"):
      previous(unraisable)
  hook.eercl_quiet_aborted_reads = True
  sys.unraisablehook = hook


@contextlib.contextmanager
def _reading(directory: str, step: int) -> Iterator[None]:
  """Any failure to read the step's files (orbax, TensorStore, JSON) becomes one
  UnreadableCheckpoint naming the step folder; the user errors raised inside pass."""
  _quiet_aborted_reads()   # before: the reads left in flight may end before the error is raised
  try:
    yield
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise UnreadableCheckpoint(step_folder(directory, step), step, cause(e)) from e


def _manager(directory: str, max_to_keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=ITEMS)


class RunCheckpoints:
  """Latest (for resuming) and best (by the selection rule) checkpoints of one run: best/, and
  `extra_best` folders (best_<rule>/: an adaptation's other selection rules), one step each."""

  def __init__(self, workdir: str, keep: int = 4, best_name: str = "best",
               extra_best: Sequence[str] = ()):
    self.latest = _manager(os.path.join(workdir, "checkpoints"), keep)
    self.best = _manager(os.path.join(workdir, best_name), 1)
    self.bests = {best_name: self.best}
    self.bests.update({name: _manager(os.path.join(workdir, name), 1) for name in extra_best})

  def save(self, step: int, state: Any, data_state: dict, meta: dict,
           best: bool | str = False) -> None:
    """Into checkpoints/, or with `best` into best/ (True) or the named best folder."""
    manager = (self.latest if not best else self.best if best is True else self.bests[best])
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state),
                              meta=ocp.args.JsonSave(meta))
    manager.save(step, args=args, force=True)
    manager.wait_until_finished()

  def latest_step(self):
    return self.latest.latest_step()

  def steps(self) -> list[int]:
    """The steps of checkpoints/, newest first."""
    return sorted(self.latest.all_steps(), reverse=True)

  def latest_meta(self) -> dict:
    """The metadata of the latest checkpoint (read without restoring its state)."""
    return self.meta_at(self.latest.latest_step())

  def meta_at(self, step: int) -> dict:
    """The metadata of checkpoints/<step> (UnreadableCheckpoint if its files are damaged)."""
    with _reading(self.latest.directory, step):
      return self.latest.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))["meta"]

  def restore_at(self, step: int, abstract_state: Any):
    """(state, data_state, meta) of checkpoints/<step> (UnreadableCheckpoint if its files are
    damaged)."""
    return restore(self.latest, step, abstract_state)

  def set_aside(self, step: int, workdir: str) -> str:
    """Moves the unreadable checkpoints/<step> out of the manager's folder, to
    <workdir>/unreadable_checkpoints/<step> (kept for a look; orbax would refuse to save that
    step again and would count it among the kept ones); returns the new place."""
    where = os.path.join(workdir, "unreadable_checkpoints", str(step))
    if os.path.exists(where):
      where = f"{where}.{os.getpid()}"
    os.makedirs(os.path.dirname(where), exist_ok=True)
    os.rename(step_folder(str(self.latest.directory), step), where)
    return where

  def reload(self) -> None:
    """Re-reads the steps of checkpoints/ (after `set_aside`)."""
    self.latest.reload()

  def drop_best_after(self, step: int) -> list[int]:
    """Deletes best/ checkpoints newer than `step`. A run killed between a best/ save and the
    next latest save leaves best/ ahead of checkpoints/; the rerun recomputes those steps and
    saves them again (orbax refuses to save a step that exists, which would fail every rerun).
    Returns the dropped steps."""
    dropped = []
    for manager in self.bests.values():
      for s in manager.all_steps():
        if s > step:
          manager.delete(s)
          dropped.append(s)
    return sorted(set(dropped))

  def restore_latest(self, abstract_state: Any):
    """Returns (state, data_state, meta) of the latest checkpoint, or None if there is none."""
    step = self.latest.latest_step()
    if step is None:
      return None
    return restore(self.latest, step, abstract_state)

  def close(self):
    self.latest.close()
    for manager in self.bests.values():
      manager.close()


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any):
  args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                            data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
  with _reading(str(manager.directory), step):
    out = manager.restore(step, args=args)
  return out["state"], out["data"], out["meta"]


def read_meta(directory: str) -> tuple[int, dict]:
  """Latest step and metadata of a checkpoint directory (a `checkpoints/` or `best/` folder)."""
  manager = _manager(directory, 1)
  try:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"no orbax checkpoint found in {directory!r}")
    with _reading(directory, step):
      return step, manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))["meta"]
  finally:
    manager.close()


def read_meta_at(directory: str, step: int) -> dict:
  """The metadata of one step of a checkpoint directory."""
  manager = _manager(directory, 1)
  try:
    if step not in manager.all_steps():
      raise FileNotFoundError(f"no checkpoint of step {step} in {directory!r} (steps there: "
                              f"{sorted(manager.all_steps())})")
    with _reading(directory, step):
      return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  finally:
    manager.close()


def restore_subtree(directory: str, abstract_subtree: dict, step: int | None = None) -> dict:
  """Restores some top-level entries of a checkpoint's `state` item (e.g. only `params` and
  `batch_stats` of a source run) into the shapes, dtypes and shardings of `abstract_subtree`."""
  manager = _manager(directory, 1)
  try:
    step = manager.latest_step() if step is None else step
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_subtree)
    out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=abstract_subtree, restore_args=restore_args, partial_restore=True)))
  finally:
    manager.close()
  return out["state"]


def abstract_like(tree: Any) -> Any:
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


# ----------------------------------------------------------------------------------------------
# Run folders: a workdir, its best/ or checkpoints/

# Which checkpoint of a run's workdir: its rule-selected best, one of an adaptation's other rules,
# the latest, or 'auto': best/ of a source run, the label-free SND selection of an adaptation.
WHICH = ("auto", "best", "latest", "oracle", "im", "snd")
# The label-free rule 'auto' takes for an adaptation run (selection.py).
AUTO_RULE = "snd"


def _selected_by(folder: str) -> str | None:
  """The rule that put the checkpoints of `folder` there (their metadata's `selected_by`)."""
  try:
    return read_meta(folder)[1].get("selected_by")
  except (FileNotFoundError, OSError, ValueError):
    return None


def _stage_of(path: str) -> str | None:
  for sub in ("best", "checkpoints"):
    if os.path.isdir(os.path.join(path, sub)):
      try:
        return read_meta(os.path.join(path, sub))[1].get("stage")
      except (FileNotFoundError, OSError, ValueError):
        continue
  return None


def resolve_run_dir(path: str, which: str = "best", what: str = "checkpoint") -> str:
  """The checkpoint folder of `path`: a run's workdir, or a checkpoint folder given directly.
  Of a workdir, `which` picks (`what` names the setting in errors):
    best    its best/ - the original's best_model.pth: the checkpoint of the run's own
            selection rule (config.data.select_by); its checkpoints/ when it has no best/
    latest  its checkpoints/
    oracle, im, snd  the checkpoint an adaptation kept by that rule: best/ when it is the run's
            own rule, else best_<rule>/ (oracle: the best target accuracy - it uses target labels)
    auto    best/ of a source run; for an adaptation run the label-free rule AUTO_RULE, said in
            the log - the default of the tools that use a trained model."""
  if which not in WHICH:
    raise ConfigError(f"which={which!r}: expected one of {', '.join(WHICH)}")
  if not path:
    raise ConfigError(f"{what} is empty: name a run's workdir (or its best/ or checkpoints/ "
                      "folder)")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{what}={path!r} does not exist")
  subs = [d for d in ("best", "checkpoints") if os.path.isdir(os.path.join(path, d))]
  if not subs and not any(d.startswith("best_") for d in os.listdir(path)):
    return path                       # a checkpoint folder itself
  if which == "auto":
    which = AUTO_RULE if _stage_of(path) == "adapt" else "best"
    if which != "best":
      logging.warning("%s is an adaptation run: using its checkpoint selected by %s, which uses "
                      "no target label (ask for another with which=oracle|best|latest|im|snd)",
                      path, which.upper())
  if which in ("oracle", "im", "snd"):
    own = os.path.join(path, f"best_{which}")
    if os.path.isdir(own):
      return own
    if "best" in subs and _selected_by(os.path.join(path, "best")) == which:
      return os.path.join(path, "best")
    raise CheckpointError(f"{what}={path!r} holds no checkpoint selected by {which} (it has "
                          f"{sorted(d for d in os.listdir(path) if d.startswith('best'))}); "
                          "only adaptation runs keep one per selection rule")
  order = ("best", "checkpoints") if which == "best" else ("checkpoints",)
  for sub in order:
    if sub in subs:
      if sub != order[0]:
        logging.warning("%s has no %s/ folder: using its latest checkpoint in %s/ instead",
                        path, order[0], sub)
      return os.path.join(path, sub)
  raise CheckpointError(f"{what}={path!r} has no {order[0]}/ folder")


def restore_variables(directory: str, model, image_size: int, sharding,
                      step: int | None = None) -> tuple[dict, int]:
  """{'params', 'batch_stats'} of `model` from a checkpoint folder (its latest step unless
  `step`), restored into the model's abstract shapes with `sharding`. Returns (variables, step)."""
  # pylint: disable=import-outside-toplevel
  from eercl_jax.models import eercl
  if step is None:
    step, _ = read_meta(directory)
  abstract = jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
      eercl.variable_shapes(model, image_size))
  _quiet_aborted_reads()
  try:
    return restore_subtree(directory, abstract, step), step
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # A damaged file or a checkpoint of another model (the metadata checks of the callers
    # catch most of the latter before): one line naming the step folder either way.
    raise CheckpointError(
        f"could not restore params/batch_stats from the checkpoint folder "
        f"{step_folder(directory, step)} (step {step}): {cause(e)}; if its files are truncated "
        "or damaged, restore the folder from a copy or delete it to use another "
        "checkpoint") from e


# ----------------------------------------------------------------------------------------------
# Metadata: what a checkpoint records about its run, and the check on restoring it

def config_json(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def run_meta(config, step: int, extra: dict | None = None) -> dict:
  """The `meta` item: stage, step, the model's architecture, class names, the whole config."""
  # pylint: disable=import-outside-toplevel
  from eercl_jax.models import registry
  meta = {"stage": config.stage, "step": int(step), "model": config_json(config.model),
          "arch": registry.arch_of(config.model),
          "class_names": list(config.data.class_names), "config": config_json(config)}
  meta.update(extra or {})
  return meta


def check_model_meta(meta: dict, config, where: str) -> None:
  """A checkpoint must match the config's classes and architecture (the fields the backbone's
  registry entry names); the error lists every difference."""
  # pylint: disable=import-outside-toplevel
  from eercl_jax.models import registry
  want = registry.arch_of(config.model)
  have = meta.get("arch", {})
  diffs = [f"model.{k}: checkpoint {have.get(k)!r} vs config {v!r}"
           for k, v in want.items() if have.get(k) != v]
  if list(meta.get("class_names", [])) != list(config.data.class_names):
    diffs.append(f"data.class_names: checkpoint {meta.get('class_names')} vs config "
                 f"{list(config.data.class_names)}")
  if diffs:
    raise CheckpointError(f"checkpoint {where} does not match the config:\n  "
                          + "\n  ".join(diffs))


def encode_data_state(state: Any) -> Any:
  """grain iterator states may hold bytes; JSON needs text."""
  if isinstance(state, bytes):
    return {"__bytes__": state.hex()}
  if isinstance(state, dict):
    return {k: encode_data_state(v) for k, v in state.items()}
  if isinstance(state, (list, tuple)):
    return [encode_data_state(v) for v in state]
  return state


def decode_data_state(state: Any) -> Any:
  if isinstance(state, dict):
    if set(state) == {"__bytes__"}:
      return bytes.fromhex(state["__bytes__"])
    return {k: decode_data_state(v) for k, v in state.items()}
  if isinstance(state, list):
    return [decode_data_state(v) for v in state]
  return state


# Config fields that fix array shapes or the data stream: resuming with other values would not
# continue the same run. Everything else may change on a resume (logged): cadences, num_steps
# (not below the checkpoint's step), worker counts, paths of evaluation lists, ...
RESUME_FIXED = ("stage", "seed", "batch_size", "bn_group_size", "virtual_devices", "model.",
                "data.train_list", "data.class_names", "data.resize", "data.crop", "data.mean",
                "data.std", "adapt.negative_bank_size", "adapt.shard_banks",
                "adapt.refresh_every", "adapt.faithful_bank_init", "source_checkpoint")
_RESUME_FREE = ("model.init_from", "model.remat")   # used only at start, or numerically neutral


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def check_resume_config(stored: dict, config, step: int, where: str) -> None:
  """Before restoring: the stored config of a checkpoint against the current one. Differences
  in fields that change shapes or the data stream are an error listing each (old -> new);
  others are logged. A `num_steps` below the checkpoint's step is an error."""
  old, new = _flat(stored), _flat(config_json(config))
  changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
  fixed = [k for k in changed if k.startswith(RESUME_FIXED) and k not in _RESUME_FREE
           and k != "per_device_batch_size"]
  if fixed:
    raise ConfigError(
        f"cannot resume {where} (step {step}) with this config: these fields change shapes or "
        "the data stream (use a new --workdir, or restore the old values):\n  "
        + "\n  ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in fixed))
  if config.num_steps < step:
    raise ConfigError(f"config.num_steps={config.num_steps} is below the step {step} of the "
                     f"checkpoint in {where}: the run would end before it starts")
  for k in changed:
    logging.info("resuming with %s changed: %r -> %r", k, old.get(k), new.get(k))


def describe_pixels(pixels: dict) -> str:
  """How a run's training images reach its views (`pixels`: {'format', 'stored_size', 'set'})."""
  if pixels.get("format") != "packed":
    return "'folder' (the image files, decoded)"
  size = pixels.get("stored_size")
  kind = "lossless" if size is None else f"stored resized to {size}x{size}"
  return f"'packed' ({kind}, {pixels.get('set')})"


def check_resume_pixels(meta: dict, pixels: dict | None, step: int, where: str) -> None:
  """Before restoring: the training list's images must reach the views as in the checkpoint's
  run. A packed set stored resized (`pack --resize`) changes the strong views (their random crop
  starts from the squashed image, docs/data.md), so changing `data.format` between image files
  or a lossless set and a resized set - or between two stored sizes - would not continue the same
  run; folder <-> lossless packed gives the same batches and is allowed. `pixels` None (not
  known) or a checkpoint of a packed run that predates this record skip the check."""
  if pixels is None:
    return
  old = meta.get("train_pixels")
  if old is None:
    if meta.get("config", {}).get("data", {}).get("format", "folder") != "folder":
      return
    old = {"format": "folder", "stored_size": None}
  if old.get("stored_size") != pixels.get("stored_size"):
    raise ConfigError(
        f"cannot resume {where} (step {step}) with this config: the training images would reach "
        "the strong views at another size (docs/data.md, stored resized; use a new --workdir, or "
        f"restore the old data):\n  data.format: {describe_pixels(old)} -> "
        f"{describe_pixels(pixels)}")
