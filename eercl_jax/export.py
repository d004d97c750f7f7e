"""Taking a trained model out of a run: whole, as an exported model that loads without the run
or its config and can be served by TensorFlow (the command: `python -m eercl_jax.tools.export`;
the format: eercl_jax/artefact.py, eercl_jax/serving.py, docs/export.md), or its backbone alone
as a public-format `.npz` (the command: `python -m eercl_jax.tools.export_npz`).

The model is rebuilt from the checkpoint's own metadata (`meta['model']`,
`meta['config']['data']['crop']`) unless a config is given. The layout is the backbone's registry
entry's `export_format`: the ViT with the public JAX ViT names (`Transformer/encoderblock_N/...`,
loadable by `weights.convert.init_backbone` and by tools that read the original ViT .npz files),
the ResNet with torchvision's state-dict names (OIHW convs, BN weight/bias/running_mean/
running_var).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import ml_collections
from absl import logging

from eercl_jax import artefact, checkpoints, inference, parallel, serving
from eercl_jax.data import pipelines
from eercl_jax.errors import CheckpointError
from eercl_jax.models import eercl, registry
from eercl_jax.weights import convert

# The forms an exported model can take: 'jax' (manifest + variables, for
# `eercl_jax.inference.load`) and 'saved_model' (the same plus a TF SavedModel).
FORMATS = ("saved_model", "jax")


def write_model(out: str, model_config, variables: dict, class_names, view: dict,
                source: dict | None = None, fmt: str = "saved_model") -> str:
  """Writes the exported model of `variables` (a `config.model`'s model) to the new folder
  `out`: the manifest (see `artefact.manifest`; `view` = {'resize', 'crop', 'mean', 'std'}),
  the variables and, for fmt='saved_model', the TF SavedModel. The folder is built beside `out`
  and renamed into place, so `out` is complete or absent; an `out` that exists and is not an
  empty folder is refused. Returns `out`."""
  if fmt not in FORMATS:
    raise ValueError(f"format {fmt!r}: expected one of {FORMATS}")
  if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
    raise FileExistsError(f"{out}: already exists; give a new folder for the exported model")
  model_config = ml_collections.ConfigDict(model_config.to_dict())
  model_config.size = registry.size_of(model_config)
  model = eercl.create_model(model_config)
  host = jax.device_get({k: variables[k] for k in artefact.COLLECTIONS if k in variables})
  crop = int(view["crop"])
  serving_entry = {}
  if fmt == "saved_model":
    serving_entry = {"tf_saved_model": serving.describe(crop, artefact.SAVED_MODEL)}
  doc = artefact.manifest(model_config, class_names, view, source or {}, serving_entry)
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.", dir=parent)
  try:
    artefact.write_variables(tmp, host)
    manifest_file = os.path.join(tmp, artefact.MANIFEST)
    with open(manifest_file, "w", encoding="utf-8") as f:
      json.dump(doc, f, indent=2)
    if fmt == "saved_model":
      norm = pipelines.Normalization(tuple(doc["input"]["mean"]), tuple(doc["input"]["std"]))
      serving.write_saved_model(os.path.join(tmp, artefact.SAVED_MODEL), model, host, norm,
                                crop, manifest_file)
    if os.path.isdir(out):
      os.rmdir(out)
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  logging.info("exported %s", out)
  return out


def export_model(checkpoint: str, out: str, which: str = "auto", fmt: str = "saved_model") -> str:
  """Writes the model of `checkpoint` (anything `inference.load` takes: a run's workdir - its
  best/ unless which='latest' -, a checkpoint or step folder, or an exported model) to the new
  folder `out` (see `write_model`); the model, classes and test view come from the checkpoint's
  stored config. Returns `out`."""
  mesh = parallel.create_mesh(jax.local_devices()[:1])
  loaded = inference.load(checkpoint, which, what="checkpoint", mesh=mesh)
  data = loaded.config.data
  view = {k: data[k] for k in ("resize", "crop", "mean", "std")}
  source = ({"checkpoint": loaded.meta["source"].get("checkpoint"), "step": loaded.step,
             "stage": loaded.stage} if loaded.exported else
            {"checkpoint": os.path.abspath(loaded.directory), "step": loaded.step,
             "stage": loaded.stage})
  return write_model(out, loaded.config.model, loaded.variables, loaded.class_names, view,
                     source, fmt)


def backbone_npz(checkpoint: str, out_path: str, config=None, which: str = "best",
                 step: int | None = None) -> str:
  """Writes the backbone of `checkpoint` (a run's workdir - its best/ unless which='latest' -
  or a checkpoint folder) to `out_path`; returns the path."""
  directory = checkpoints.resolve_run_dir(checkpoint, which, what="checkpoint")
  _, meta = checkpoints.read_meta(directory)
  if config is not None:
    model_config, crop = config.model, config.data.crop
  else:
    model_config = ml_collections.ConfigDict(meta["model"])
    crop = meta.get("config", {}).get("data", {}).get("crop")
    if crop is None:
      raise CheckpointError(f"{directory}: metadata holds no data.crop; pass --config")
  model = eercl.create_model(model_config)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  variables, step = checkpoints.restore_variables(directory, model, crop, device, step)
  logging.info("restored %s step %d", directory, step)
  return convert.export_backbone_npz(variables, model_config, out_path)
