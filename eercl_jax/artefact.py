"""The exported model: one folder that holds a trained model whole and says what it is, so it
loads with `eercl_jax.inference.load(path)` without the run, its config or the training code's
settings (the command that writes one: `python -m eercl_jax.tools.export`; docs/export.md).

  OUT/manifest.json          what the model is and how its input is prepared (below)
  OUT/variables.safetensors  the parameters and the BN running statistics, float32, one tensor
                             per leaf, named by its path: 'params/backbone/embedding/kernel',
                             'batch_stats/sfda_bn/mean', ...
  OUT/saved_model/           (optional) a TensorFlow SavedModel of the same forward
                             (eercl_jax/serving.py)

manifest.json (format 'eercl_jax.model', version 1):

  {"format": "eercl_jax.model", "version": 1,
   "model": {"backbone", "size", "num_classes", "bottleneck_dim", "width", "feat_dim",
             "dropout", "dtype"},                       # the fields of eercl.create_model
   "class_names": [str],                              # logit k is class_names[k]
   "input": {"channels": "RGB", "dtype": "uint8", "resize": int, "crop": int,
             "interpolation": "bilinear", "mean": [3 floats], "std": [3 floats]},
   "variables": "variables.safetensors",
   "serving": {"tf_saved_model": {"path", "signature", "input", "input_shape", "outputs"}}
              or {} (no serving format written),
   "source": {"checkpoint": str, "step": int, "stage": str},   # the run it came from
   "exported_with": {"jax": str, "flax": str}}

The input: an image is decoded to RGB uint8, resized to resize x resize (Pillow bilinear,
ignoring the aspect ratio), centre-cropped to crop x crop, then normalised on the 0..255 scale,
(x - mean) / std, as the run's test view did.
"""
from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import numpy as np

from eercl_jax.errors import CheckpointError

FORMAT = "eercl_jax.model"
VERSION = 1
MANIFEST = "manifest.json"
VARIABLES = "variables.safetensors"
SAVED_MODEL = "saved_model"
# The config.model fields an exported model records (what eercl.create_model reads, but remat:
# a training-memory switch that does not change the function).
MODEL_KEYS = ("backbone", "size", "num_classes", "bottleneck_dim", "width", "feat_dim",
              "dropout", "dtype")
INPUT_KEYS = ("resize", "crop", "mean", "std")
COLLECTIONS = ("params", "batch_stats")


def is_artefact(path: str) -> bool:
  """Whether `path` names an exported model rather than a run or checkpoint folder: its
  manifest.json, or a folder holding a manifest.json, a variables.safetensors or a
  saved_model/ (so a folder missing only its manifest is reported as such)."""
  if not path:
    return False
  if os.path.basename(os.path.normpath(path)) == MANIFEST:
    return True
  return os.path.isdir(path) and any(
      os.path.exists(os.path.join(path, name)) for name in (MANIFEST, VARIABLES, SAVED_MODEL))


def folder_of(path: str) -> str:
  """The exported model's folder of `path` (the folder itself or its manifest.json)."""
  path = os.path.normpath(path)
  return os.path.dirname(path) if os.path.basename(path) == MANIFEST else path


def manifest(model_config, class_names, view: dict, source: dict,
             serving: dict | None = None) -> dict:
  """The manifest of a model: `model_config` a config.model (size resolved by the caller),
  `view` {'resize', 'crop', 'mean', 'std'} of the run's config.data, `source` {'checkpoint',
  'step', 'stage'}."""
  # pylint: disable=import-outside-toplevel
  import flax
  import jax
  model = {k: model_config[k] for k in MODEL_KEYS}
  model["dropout"] = float(model["dropout"])
  return {
      "format": FORMAT, "version": VERSION,
      "model": model,
      "class_names": [str(c) for c in class_names],
      "input": {"channels": "RGB", "dtype": "uint8", "resize": int(view["resize"]),
                "crop": int(view["crop"]), "interpolation": "bilinear",
                "mean": [float(v) for v in view["mean"]],
                "std": [float(v) for v in view["std"]]},
      "variables": VARIABLES,
      "serving": dict(serving or {}),
      "source": {"checkpoint": source.get("checkpoint"), "step": source.get("step"),
                 "stage": source.get("stage")},
      "exported_with": {"jax": jax.__version__, "flax": flax.__version__},
  }


def read_manifest(path: str) -> dict:
  """The checked manifest of the exported model at `path` (its folder or its manifest.json);
  anything missing or of another format is a CheckpointError naming the file."""
  file = os.path.join(folder_of(path), MANIFEST)
  if not os.path.isfile(file):
    raise CheckpointError(f"{file}: missing; an exported model's folder holds manifest.json "
                          "next to variables.safetensors (python -m eercl_jax.tools.export "
                          "writes both)")
  try:
    with open(file, encoding="utf-8") as f:
      doc = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{file}: unreadable manifest ({type(e).__name__}: {e})") from e
  if not isinstance(doc, dict) or doc.get("format") != FORMAT:
    got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
    raise CheckpointError(f"{file}: format {got!r}, expected {FORMAT!r}")
  if doc.get("version") != VERSION:
    raise CheckpointError(f"{file}: format version {doc.get('version')!r}; this eercl_jax "
                          f"reads version {VERSION}")
  wanted = [("model", k) for k in MODEL_KEYS] + [("input", k) for k in INPUT_KEYS]
  for section, key in wanted:
    if not isinstance(doc.get(section), dict) or key not in doc[section]:
      raise CheckpointError(f"{file}: no {section}.{key}")
  names = doc.get("class_names")
  if not isinstance(names, list) or len(names) != doc["model"]["num_classes"]:
    raise CheckpointError(f"{file}: class_names must list model.num_classes="
                          f"{doc['model']['num_classes']} names, got {names!r}")
  crop, resize = doc["input"]["crop"], doc["input"]["resize"]
  if not (isinstance(crop, int) and isinstance(resize, int) and 0 < crop <= resize):
    raise CheckpointError(f"{file}: input.crop={crop!r} and input.resize={resize!r} must be "
                          "integers with 0 < crop <= resize")
  for key in ("mean", "std"):
    if len(doc["input"][key]) != 3:
      raise CheckpointError(f"{file}: input.{key} must hold 3 values (R, G, B)")
  return doc


def config(doc: dict) -> ml_collections.ConfigDict:
  """The parts of a run's config an exported model stands for: config.model, the test view and
  classes of config.data, and the decoding defaults `pipelines.Loader.from_config` reads."""
  inp = doc["input"]
  return ml_collections.ConfigDict({
      "model": dict(doc["model"], remat=False, init_from=""),
      "data": {"class_names": tuple(doc["class_names"]), "resize": inp["resize"],
               "crop": inp["crop"], "mean": tuple(inp["mean"]), "std": tuple(inp["std"]),
               "num_workers": 0, "prefetch": 2},
  })


# ------------------------------------------------------------------------------ variables

def leaves(variables: dict) -> dict[str, Any]:
  """{'params': {'a': {'b': x}}} -> {'params/a/b': x}: the leaves of the params and BN stats by
  path (the tensor names of variables.safetensors)."""
  out = {}

  def walk(prefix, node):
    if hasattr(node, "items"):
      for k, v in node.items():
        walk(f"{prefix}/{k}", v)
    else:
      out[prefix] = node
  for name in COLLECTIONS:
    if name in variables:
      walk(name, variables[name])
  return out


def unflatten(flat: dict[str, Any]) -> dict:
  """The inverse of `leaves`."""
  out: dict = {}
  for key, value in flat.items():
    node = out
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def write_variables(folder: str, variables: dict) -> str:
  """variables.safetensors of `variables` (host copies) in `folder`; returns its path."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  path = os.path.join(folder, VARIABLES)
  flat = {k: np.ascontiguousarray(np.asarray(v)) for k, v in leaves(variables).items()}
  save_file(flat, path, metadata={"format": FORMAT, "version": str(VERSION)})
  return path


def read_variables(path: str, doc: dict, model) -> dict:
  """{'params', 'batch_stats'} (numpy) of the exported model at `path`, checked tensor by
  tensor against `model`'s variables at the manifest's crop size; a missing, extra or misshapen
  tensor is a CheckpointError naming the file and the tensor."""
  # pylint: disable=import-outside-toplevel
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  from eercl_jax.models import eercl
  file = os.path.join(folder_of(path), doc.get("variables") or VARIABLES)
  if not os.path.isfile(file):
    raise CheckpointError(f"{file}: missing (the manifest's variables file)")
  try:
    flat = load_file(file)
  except (OSError, SafetensorError, ValueError) as e:
    raise CheckpointError(f"{file}: unreadable ({type(e).__name__}: {e})") from e
  want = leaves(eercl.variable_shapes(model, doc["input"]["crop"]))
  missing = sorted(set(want) - set(flat))
  extra = sorted(set(flat) - set(want))
  wrong = [f"{k} {tuple(flat[k].shape)}, the model's {tuple(want[k].shape)}"
           for k in sorted(set(want) & set(flat)) if tuple(flat[k].shape) != want[k].shape]
  if missing or extra or wrong:
    parts = ([f"missing {', '.join(missing[:5])}"] if missing else []) + \
            ([f"not in the model {', '.join(extra[:5])}"] if extra else []) + \
            ([f"misshapen {'; '.join(wrong[:5])}"] if wrong else [])
    raise CheckpointError(f"{file}: does not fit the manifest's model ({'; '.join(parts)})")
  return unflatten({k: flat[k].astype(want[k].dtype, copy=False) for k in want})
