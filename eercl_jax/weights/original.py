"""The original PyTorch EERCL/CRCo trainer's checkpoints mapped onto the whole EERCL model.

Its `best_model.pth` (or any of its checkpoints) is a dict whose 'base_model' entry is the state
dict of its contrastive model wrapped in DistributedDataParallel: keys `module.online_network.*`,
`module.online_classifier.*`, `module.target_network.*`, `module.target_classifier.*` (the
'module.' prefix is optional here). The online (student) weights are used; the original's teacher
is a copy of them when stage 2 starts, so `target_*` is ignored.

Where each scope sits in that state dict is the backbone's registry entry (`models/registry.py`):
`original_prefix` + its `original_format` rule for the backbone, `original_head` for the head
scopes (names ending in `_bn` are BatchNorm1d, the others Linear), `original_aliases` for layers
the original registers twice. The classifier is `online_classifier.fc` under
torch.nn.utils.weight_norm (dim=0): weight_g (C, 1), weight_v (C, D), bias.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np
from absl import logging

from eercl_jax.errors import WeightsError
from eercl_jax.models import registry
from eercl_jax.weights import convert, readers, rules
from eercl_jax.weights.rules import Path, Rule

CLASSIFIER = {"g": "online_classifier.fc.weight_g", "v": "online_classifier.fc.weight_v",
              "b": "online_classifier.fc.bias"}
# torch.nn.utils.parametrizations.weight_norm (newer PyTorch) names the same two tensors so.
PARAMETRIZED = {
    "online_classifier.fc.weight_g": "online_classifier.fc.parametrizations.weight.original0",
    "online_classifier.fc.weight_v": "online_classifier.fc.parametrizations.weight.original1"}
# The teacher copy: equal to the student when the original's stage 2 starts (see above).
TEACHER_PREFIXES = ("target_network.", "target_classifier.")


def eercl_rule(backbone: str) -> Rule:
  """Model path (('params'|'batch_stats', scope, ...)) -> original key and transforms."""
  entry = registry.get(backbone)
  bb_rule = entry.weight_formats[entry.original_format].rule
  bb_prefix = entry.original_prefix
  head = dict(entry.original_head)

  def rule(path: Path, shape: tuple) -> tuple:
    col, scope, *rest = path
    leaf = rest[-1]
    if scope == "backbone":
      key, fwd, inv = bb_rule((col, *rest), shape)
      return bb_prefix + key, fwd, inv
    if scope == "classifier" and col == "params" and leaf in CLASSIFIER:
      if leaf == "g":   # (C, 1) -> (C,)
        return CLASSIFIER[leaf], lambda a, s: a.reshape(s), lambda a: a.reshape(-1, 1)
      return CLASSIFIER[leaf], rules.identity, rules.identity
    if scope in head:
      if scope.endswith("_bn"):
        return rules.torch_bn_rule(col, head[scope], leaf)
      if col == "params":
        return rules.torch_dense_rule(leaf, head[scope])
    raise KeyError(path)
  return rule


def ignorable(backbone: str) -> Callable[[str], bool]:
  """Keys of the original's state dict the EERCL model has no place for and may drop: the
  teacher, the alias copies, the backbone layout's own ignored keys (a ViT's ImageNet head),
  BN step counters and the parametrized weight-norm names (read through their aliases)."""
  entry = registry.get(backbone)
  layout = entry.weight_formats[entry.original_format]
  prefixes = (TEACHER_PREFIXES + tuple(entry.original_aliases)
              + tuple(entry.original_prefix + p for p in layout.ignored))
  skipped = set(PARAMETRIZED.values())
  return lambda k: (k.startswith(prefixes) or k.endswith("num_batches_tracked")
                    or k in skipped)


def base_model_state_dict(raw: Any, where: str) -> tuple[dict[str, np.ndarray], int | None]:
  """(online/teacher state dict without the DDP 'module.' prefix, the scheduler's iteration)."""
  if not isinstance(raw, dict):
    raise WeightsError(f"{where}: holds a {type(raw).__name__}, expected the original's checkpoint "
                       "dict")
  step = None
  if "base_model" in raw:
    sd = raw["base_model"]
    sched = raw.get("base_model_scheduler")
    if isinstance(sched, dict) and isinstance(sched.get("last_epoch"), int):
      step = int(sched["last_epoch"])
  elif any("online_network." in str(k) for k in raw):
    sd = raw
  else:
    raise WeightsError(f"{where}: no 'base_model' entry and no online_network.* keys (entries: "
                       f"{sorted(map(str, raw))[:10]})")
  sd = {str(k): v for k, v in sd.items() if isinstance(v, np.ndarray)}
  if sd and all(k.startswith("module.") for k in sd):
    sd = {k[len("module."):]: v for k, v in sd.items()}
  return sd, step


def add_aliases(sd: dict[str, np.ndarray], backbone: str) -> dict[str, np.ndarray]:
  """`sd` plus the names the rules read, for arrays stored only under an alias: the
  parametrized weight-norm names and the backbone entry's `original_aliases`."""
  sd = dict(sd)
  for new, old in PARAMETRIZED.items():
    if new not in sd and old in sd:
      sd[new] = sd[old]
  aliases = registry.get(backbone).original_aliases
  for k in list(sd):
    for alias, target in aliases.items():
      if k.startswith(alias):
        named = target + k[len(alias):]
        if named not in sd:
          sd[named] = sd[k]
        elif not np.array_equal(sd[named], sd[k]):
          logging.warning("%s differs from its alias %s; using the latter", k, named)
  return sd


def convert_original(sd: dict[str, np.ndarray], backbone: str, expected: dict[Path, tuple],
                     where: str) -> tuple[dict, dict]:
  """Every variable of `expected` ({(col, scope, ...): shape}, the whole EERCL model) from the
  original's state dict `sd` (as `base_model_state_dict` returns it).

  Returns ({path: array}, report) with report 'used' (keys read), 'resized' (position
  embeddings), 'ignored' (keys not read) and 'teacher_differs' (teacher keys whose array is not
  the student's). Raises a ValueError naming missing or misshapen arrays, and arrays that have
  no place in the model.
  """
  sd = add_aliases(sd, backbone)
  values, used, resized = convert.convert_arrays(sd, expected, eercl_rule(backbone), where)
  skip = ignorable(backbone)
  unexpected = sorted(k for k in sd if k not in used and not skip(k))
  if unexpected:
    raise WeightsError(f"{where}: {len(unexpected)} arrays have no place in a {backbone} EERCL "
                       f"model (other architecture or sizes?): {', '.join(unexpected[:20])}")
  teacher_diff = sorted(k for k in sd if k.startswith(TEACHER_PREFIXES)
                        and (o := "online_" + k[len("target_"):]) in sd
                        and not np.array_equal(sd[k], sd[o]))
  if teacher_diff:
    logging.info("%d teacher arrays differ from the online ones; the online weights are used "
                 "for both (as the original's stage 2)", len(teacher_diff))
  report = {"used": sorted(used), "resized": resized,
            "ignored": sorted(k for k in sd if k not in used), "teacher_differs": teacher_diff}
  return values, report


def import_checkpoint(src: str, out_dir: str, config, step: int | None = None) -> dict:
  """Writes OUT_DIR/best/<step> (an orbax checkpoint a source run would leave, which stage 2
  reads with `--config.source_checkpoint=OUT_DIR`) from the original's checkpoint `src`,
  described by `config` (its model, crop and class names); returns a report."""
  backbone = config.model.backbone
  sd, file_step = base_model_state_dict(readers.read_checkpoint(src), src)
  step = file_step if step is None else step
  step = 0 if step is None else int(step)

  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp
  from flax import traverse_util
  from eercl_jax import checkpoints
  from eercl_jax.models import eercl
  model = eercl.create_model(config.model)
  flat_shapes = traverse_util.flatten_dict(eercl.variable_shapes(model, config.data.crop))
  values, conv = convert_original(
      sd, backbone, {p: s.shape for p, s in flat_shapes.items()}, src)

  state = traverse_util.unflatten_dict(
      {p: jnp.asarray(values[p], flat_shapes[p].dtype) for p in flat_shapes})
  meta = checkpoints.run_meta(config, step, {
      "best": {"value": -1.0, "step": step}, "selected_by": "imported",
      "imported_from": os.path.abspath(src)})
  ckpt = checkpoints.RunCheckpoints(out_dir)
  try:
    ckpt.save(step, {"params": state["params"], "batch_stats": state["batch_stats"]},
              {"iterator": None}, meta, best=True)
  finally:
    ckpt.close()
  report = {"step": step, "out_dir": os.path.join(out_dir, "best"),
            "loaded": sorted("/".join(p) for p in values), "resized": conv["resized"],
            "ignored": conv["ignored"], "teacher_differs": conv["teacher_differs"]}
  logging.info("imported %s (%s, %d arrays, step %d) into %s", src, backbone, len(values), step,
               report["out_dir"])
  return report
