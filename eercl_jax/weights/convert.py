"""Flat weight files mapped onto the backbone scope of `EERCLModel`'s variables, and back.

The layouts a backbone can load are its registry entry's `weight_formats` (`models/registry.py`;
the name rules live with each backbone, e.g. `vit.timm_vit_rule`). A file's layout is recognised
by a name only that layout has (`WeightFormat.anchor`), found with any key prefix ('module.',
'opt/target/', ...). Missing or misshapen arrays raise a WeightsError naming every such key with the
expected and found shapes; the position embedding alone is resized (CLS token kept, token grid
interpolated) when the image or patch grid differs. A file whose layout belongs to another
backbone is an error naming both.
"""
from __future__ import annotations

import collections
import math
import os
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging
from flax import traverse_util

from eercl_jax.errors import WeightsError
from eercl_jax.models import registry
from eercl_jax.weights import readers
from eercl_jax.weights.posemb import resize_pos_embedding
from eercl_jax.weights.rules import Path, Rule, WeightFormat


def registered_formats() -> dict[str, tuple[str, WeightFormat]]:
  """Every layout of every registered backbone: {format name: (backbone name, format)}."""
  out = {}
  for name, entry in registry.BACKBONES.items():
    for fmt_name, fmt in entry.weight_formats.items():
      if fmt_name in out:
        raise ValueError(f"weight format {fmt_name!r} is registered by both "
                         f"{out[fmt_name][0]!r} and {name!r}")
      out[fmt_name] = (name, fmt)
  return out


def detect_format(sd: Mapping[str, Any], formats: Mapping[str, WeightFormat],
                  where: str = "state dict") -> tuple[str, str]:
  """(format name, key prefix) of a flat state dict: the format of `formats` whose anchor name
  ends one of the keys. With a prefix (e.g. 'module.' or 'opt/target/') the shortest one holding
  a full backbone wins; two formats at the same prefix are an error."""
  found = []
  for fmt_name, fmt in formats.items():
    for k in sd:
      if k.endswith(fmt.anchor):
        prefix = k[:-len(fmt.anchor)]
        if prefix == "" or prefix.endswith((".", "/")):
          found.append((len(prefix), prefix, fmt_name))
  if not found:
    sample = ", ".join(sorted(sd)[:8])
    raise WeightsError(f"{where}: unknown weight layout: no name ends with any of "
                       f"{sorted(f.anchor for f in formats.values())} (first names: {sample})")
  found.sort()
  best = [f for f in found if f[0] == found[0][0]]
  if len({f[2] for f in best}) > 1:
    raise WeightsError(f"{where}: ambiguous layout, matches {sorted({f[2] for f in best})}")
  _, prefix, fmt_name = found[0]
  return fmt_name, prefix


# ----------------------------------------------------------------------------------------------
# Applying rules

def convert_arrays(sd: dict[str, np.ndarray], expected: dict[Path, tuple], rule: Rule,
                   where: str, resize_method: str = "bilinear") -> tuple[dict, set, list]:
  """Values for every path of `expected` ({path: shape}) from `sd` through `rule`.

  Returns (values {path: array}, file keys used, notes on resized arrays). Raises a ValueError
  that lists every missing key and every shape mismatch (expected vs found).
  """
  values, used, missing, bad, resized = {}, set(), [], [], []
  for path, shape in expected.items():
    shape = tuple(shape)
    name = "/".join(path)
    try:
      key, fwd, _ = rule(path, shape)
    except KeyError:
      bad.append(f"{name}: no rule maps a file array onto it")
      continue
    if key not in sd:
      missing.append(f"{key} (for {name}, shape {shape})")
      continue
    used.add(key)
    src = np.asarray(sd[key])
    try:
      value = np.asarray(fwd(src, shape))
    except (ValueError, TypeError) as e:
      bad.append(f"{key}: found {src.shape}, cannot become {name} {shape} ({e})")
      continue
    if value.shape != shape and path[-1] == "pos_embedding" and value.ndim == 3 \
        and value.shape[0] == 1 and value.shape[2] == shape[2]:
      try:
        value = resize_pos_embedding(value, shape[1], method=resize_method)
      except ValueError as e:
        bad.append(f"{key}: found {src.shape}, cannot be resized to {shape} ({e})")
        continue
      resized.append(f"{name}: file {src.shape} -> model {shape}, {resize_method} resize of "
                     "the patch grid (CLS kept)")
    if value.shape != shape:
      bad.append(f"{key}: expected {shape} (as {name}), found {src.shape}"
                 + (f" -> {value.shape}" if value.shape != src.shape else ""))
      continue
    values[path] = value
  if missing or bad:
    lines = ([f"missing: {m}" for m in missing] + [f"mismatched: {b}" for b in bad])
    raise WeightsError(f"{where}: {len(missing)} missing and {len(bad)} mismatched arrays "
                       "(wrong architecture/size, or a truncated file):\n  " + "\n  ".join(lines))
  return values, used, resized


def _flat_shapes(tree) -> dict[Path, tuple]:
  return {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(tree).items()}


def _backbone_trees(variables) -> dict[str, Any]:
  return {col: variables[col]["backbone"] for col in ("params", "batch_stats")
          if col in variables and "backbone" in variables[col]}


def convert_backbone(sd: dict[str, np.ndarray], backbone: str, backbone_variables: dict,
                     where: str, resize_method: str = "bilinear",
                     fmt: str | None = None, prefix: str | None = None) -> tuple[dict, dict]:
  """Backbone arrays from a state dict. `backbone_variables` = {'params': ..., 'batch_stats': ...}
  of the backbone scope (arrays or ShapeDtypeStructs). Returns ({(col, *path): array}, report)."""
  formats = registry.get(backbone).weight_formats
  if fmt is None:
    # Every registered layout, so that another backbone's file is named as such.
    known = registered_formats()
    fmt, found_prefix = detect_format(sd, {n: f for n, (_, f) in known.items()}, where)
    prefix = found_prefix if prefix is None else prefix
    if fmt not in formats:
      raise WeightsError(f"{where}: holds {fmt} weights (a {known[fmt][0]!r} backbone), which do "
                         f"not fit config.model.backbone={backbone!r} (expected one of "
                         f"{list(formats)})")
  elif fmt not in formats:
    raise WeightsError(f"{where}: layout {fmt!r} does not fit config.model.backbone={backbone!r} "
                       f"(expected one of {list(formats)})")
  prefix = prefix or ""
  layout = formats[fmt]
  sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
  expected = _flat_shapes(backbone_variables)
  values, used, resized = convert_arrays(sub, expected, layout.rule, where, resize_method)
  unexpected = sorted(k for k in sub if k not in used and not layout.ignorable(k))
  if unexpected:
    raise WeightsError(f"{where}: {len(unexpected)} arrays of the {fmt} file have no place in the "
                       f"model (deeper or different architecture?): {', '.join(unexpected[:20])}"
                       + (" ..." if len(unexpected) > 20 else ""))
  ignored = sorted(prefix + k for k in sub if k not in used)
  ignored += sorted(k for k in sd if not k.startswith(prefix))
  report = {"format": fmt, "prefix": prefix, "loaded": sorted("/".join(p) for p in values),
            "ignored": ignored, "mismatched": resized}
  return values, report


def _like(old, value: np.ndarray):
  """`value` with the dtype (and, for jax arrays, the sharding) of the leaf it replaces."""
  dtype = old.dtype
  value = np.asarray(value).astype(dtype)
  if isinstance(old, jax.Array):
    return jax.device_put(value, old.sharding)
  return value


def init_backbone(model_config, variables: dict, path: str,
                  resize_method: str = "bilinear") -> tuple[dict, dict]:
  """Loads the backbone of `variables` (EERCLModel's {'params', 'batch_stats'}) from `path`.

  `model_config.backbone` selects the accepted layouts (its registry entry's `weight_formats`);
  the file's layout is detected from its names. Returns (new variables, report) where report has
  'loaded' (model paths), 'newly_initialised' (model paths left as initialised: the EERCL head),
  'ignored' (file keys not used, e.g. a classification head), 'mismatched' (resized position
  embeddings), plus 'format', 'prefix' and 'path'. Leaves keep their dtype and sharding.
  """
  if not path:
    return variables, {"loaded": [], "newly_initialised": sorted(
        "/".join(p) for p in traverse_util.flatten_dict(dict(variables))), "ignored": [],
        "mismatched": [], "format": None, "path": ""}
  sd = readers.load_state_dict(path)
  values, report = convert_backbone(sd, model_config.backbone, _backbone_trees(variables), path,
                                    resize_method)
  flat = traverse_util.flatten_dict(dict(variables))
  new_flat, fresh = {}, []
  for p, leaf in flat.items():
    key = (p[0],) + p[2:] if len(p) > 2 and p[1] == "backbone" else None
    if key is not None and key in values:
      new_flat[p] = _like(leaf, values[key])
    else:
      new_flat[p] = leaf
      fresh.append("/".join(p))
  report["loaded"] = sorted(f"{p[0]}/backbone/{'/'.join(p[1:])}" for p in values)
  report["newly_initialised"] = sorted(fresh)
  report["path"] = path
  log_report(report, sum(math.prod(np.shape(v)) for v in values.values()))
  return traverse_util.unflatten_dict(new_flat), report


def log_report(report: dict, num_values: int) -> None:
  scopes = collections.Counter(p.split("/")[1] if "/" in p else p
                               for p in report["newly_initialised"])
  logging.info("pretrained backbone from %s (%s layout%s): loaded %d arrays (%.2fM values)",
               report["path"], report["format"],
               f", prefix {report['prefix']!r}" if report.get("prefix") else "",
               len(report["loaded"]), num_values / 1e6)
  if scopes:
    logging.info("  newly initialised: %s", ", ".join(f"{s} ({n})" for s, n in
                                                     sorted(scopes.items())))
  if report["ignored"]:
    shown = report["ignored"][:10]
    logging.info("  ignored file arrays (%d): %s%s", len(report["ignored"]), ", ".join(shown),
                 " ..." if len(report["ignored"]) > 10 else "")
  for line in report["mismatched"]:
    logging.info("  %s", line)


# ----------------------------------------------------------------------------------------------
# Export

def backbone_state_dict(variables: dict, backbone: str) -> dict[str, np.ndarray]:
  """The backbone as a flat state dict in its registry entry's `export_format` (public JAX .npz
  names for the ViT, torchvision names - OIHW convs, BN weight/bias/running_mean/running_var -
  for the ResNet)."""
  entry = registry.get(backbone)
  rule = entry.weight_formats[entry.export_format].rule
  flat = traverse_util.flatten_dict(_backbone_trees(variables))
  out = {}
  for p, v in flat.items():
    key, _, inv = rule(p, tuple(np.shape(v)))
    if inv is None:
      raise ValueError(f"the {entry.export_format} layout cannot write {'/'.join(p)} back")
    out[key] = np.asarray(inv(np.asarray(jax.device_get(v))))
  return out


def export_backbone_npz(variables: dict, model_config, path: str) -> str:
  """Writes the backbone of `variables` to `path` (.npz, exactly that name) in the layout
  `backbone_state_dict` describes; `init_backbone` reads it back exactly."""
  sd = backbone_state_dict(variables, model_config.backbone)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    np.savez(f, **sd)
  logging.info("exported %d backbone arrays to %s", len(sd), path)
  return path
