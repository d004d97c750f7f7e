"""Using a trained model: loading it (`load(path).predict(images)`), evaluating it on any lists
(`--config.mode=eval` of `eercl_jax.main`), and the batched, sharded prediction of image files
(`eercl_jax.predict`).

A model is named by a run's workdir (its best/ or, with 'latest', its checkpoints/ folder), one
of those folders, one step's folder inside them (`runs/x/checkpoints/500`), or an exported
model's folder (`python -m eercl_jax.tools.export`, eercl_jax/artefact.py), which loads without
the run or any config. The model, the class names and the test view (resize, crop, mean, std)
always come from the checkpoint's stored config or the exported model's manifest, so they match
the weights whatever config is given; a given config that differs in them is reported.

    model = inference.load("exported/raf_vit")           # or a run's workdir
    model.predict([Image.open("a.jpg"), np.zeros((48, 48), np.uint8)])
    # -> [{"class": "happy", "index": 3, "probabilities": {"angry": 0.01, ...}}, ...]

The evaluation JSON (`config.eval.output`, default WORKDIR/eval/<folder>_step<N>.json):

  {"checkpoint": str, "step": int, "stage": str, "class_names": [str],
   "confusion_convention": "rows = true class, columns = predicted class",
   "lists": {<name>: {"list": str, "count": int, "accuracy": float,
                      "mean_class_accuracy": float,
                      "per_class_accuracy": {<class>: float | null},
                      "confusion": [[int]]}}}

Accuracies are fractions in 0..1; a class without images has a null per-class accuracy.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from eercl_jax import artefact, checkpoints, config_defaults, evaluation, parallel
from eercl_jax.data import images, lists, pipelines, run_lists
from eercl_jax.errors import CheckpointError, ConfigError, DataError
from eercl_jax.models import eercl

CONFUSION_CONVENTION = "rows = true class, columns = predicted class"
# The fields of config.data that must match the weights (taken from the checkpoint).
_VIEW_KEYS = ("class_names", "resize", "crop", "mean", "std")
# Images per batch of an exported model's evaluator (a run's checkpoint uses its eval batch).
DEFAULT_BATCH_SIZE = 64


def resolve_checkpoint(path: str, which: str = "auto",
                       what: str = "checkpoint") -> tuple[str, int]:
  """(orbax folder, step) of `path`: a step folder inside a checkpoint folder, or anything
  `checkpoints.resolve_run_dir` takes (then its latest step)."""
  path = os.path.normpath(path) if path else path
  if path and os.path.basename(path).isdigit() and os.path.isdir(path) and \
      os.path.isdir(os.path.join(path, "meta")):
    return os.path.dirname(path), int(os.path.basename(path))
  directory = checkpoints.resolve_run_dir(path, which, what=what)
  step, _ = checkpoints.read_meta(directory)
  return directory, step


class Loaded:
  """A trained model and its variables, ready to predict: `evaluator` is the model's eval
  forward with its own test view and normalisation. From a checkpoint, `meta` is the
  checkpoint's metadata and `config` its stored run config; from an exported model, `meta` is
  the manifest and `config` holds only what the manifest records (model, data's test view and
  classes; `artefact.config`)."""

  def __init__(self, directory: str, step: int, meta: dict, config, model, variables: dict,
               evaluator: evaluation.Evaluator, exported: bool = False):
    self.directory, self.step, self.meta = directory, step, meta
    self.config: ml_collections.ConfigDict = config
    self.model, self.variables, self.evaluator = model, variables, evaluator
    self.exported = exported

  @property
  def class_names(self) -> tuple[str, ...]:
    return tuple(self.config.data.class_names)

  @property
  def selection(self) -> str:
    """How this checkpoint was chosen among the run's, in words."""
    if self.exported:
      src = self.meta.get("source", {})
      return f"exported model (from {src.get('checkpoint', '?')} step {src.get('step', '?')})"
    rule = self.meta.get("selected_by")
    if rule is None:
      return "the latest checkpoint"
    if rule == "oracle":
      return "selected by target accuracy (oracle: uses target labels)"
    if rule in ("im", "snd"):
      return f"selected by {rule.upper()} (uses no target label)"
    return f"selected by {rule} accuracy"

  @property
  def stage(self) -> str | None:
    """The training stage the model comes from ('source' or 'adapt'), where recorded."""
    return self.meta.get("source", {}).get("stage") if self.exported else self.meta.get("stage")

  def probabilities(self, inputs) -> np.ndarray:
    """(N, C) float32 class probabilities of `inputs` (see `predict`), in order."""
    fer_list, pixels = _as_list(inputs, self.class_names)
    if not len(fer_list):
      return np.zeros((0, len(self.class_names)), np.float32)
    return self.evaluator.outputs(self.variables, fer_list, images=pixels)["probabilities"]

  def predict(self, inputs) -> list[dict]:
    """One {'class': name, 'index': k, 'probabilities': {class: p}} per input, in order.

    `inputs` is a sequence of images of any sizes - Pillow images, uint8 arrays (H, W)
    (greyscale), (H, W, 1), (H, W, 3) (RGB) or (H, W, 4) (alpha dropped), or image file paths -
    or one uint8 array holding a batch (N, H, W[, C]). Each goes through the model's own test
    view (square bilinear resize, centre crop) and normalisation, in batches sharded over the
    devices, exactly as in evaluation; file paths alone are decoded by the grain workers."""
    probs = self.probabilities(inputs)
    names = list(self.class_names)
    out = []
    for p in probs:
      k = int(np.argmax(p))
      out.append({"class": names[k], "index": k,
                  "probabilities": {c: float(v) for c, v in zip(names, p)}})
    return out


def _as_list(inputs, class_names) -> tuple[lists.FerList, list | None]:
  """A list over `inputs` (see `Loaded.predict`) and their pixels (None: all are files, read by
  the list's pipeline)."""
  if isinstance(inputs, (str, os.PathLike)) or not hasattr(inputs, "__len__") or \
      (isinstance(inputs, np.ndarray) and inputs.ndim < 3) or hasattr(inputs, "getpixel"):
    raise DataError(f"expected a list of images (or an (N, H, W[, C]) array), got "
                    f"{type(inputs).__name__}; wrap a single image in a list")
  items = list(inputs)
  if items and all(isinstance(x, (str, os.PathLike)) for x in items):
    paths, pixels = tuple(os.path.abspath(os.fspath(x)) for x in items), None
  else:
    paths = tuple(f"images[{i}]" for i in range(len(items)))
    pixels = [images.as_rgb(x, name) for x, name in zip(items, paths)]
  fer_list = lists.FerList(
      list_path="<predict inputs>", image_root=os.path.abspath(os.sep), paths=paths,
      labels=np.zeros(len(items), np.int32), class_names=tuple(class_names),
      lines=np.arange(1, len(items) + 1, dtype=np.int32), num_skipped=0)
  return fer_list, pixels



def load(path: str, which: str = "auto", what: str = "checkpoint", mesh=None,
         batch_size: int | None = None, num_workers: int | None = 0) -> Loaded:
  """The model of a checkpoint (see `resolve_checkpoint`) or of an exported model's folder,
  restored replicated on `mesh` (default: every device), with an evaluator of `batch_size`
  images per batch (default: the run's own evaluation batch; DEFAULT_BATCH_SIZE for an
  exported model), rounded up to fill every device, decoding files on `num_workers` grain
  workers (None: follow the host's cores). `which` picks a workdir's checkpoint."""
  mesh = parallel.create_mesh() if mesh is None else mesh
  if artefact.is_artefact(path):
    directory = artefact.folder_of(path)
    meta = artefact.read_manifest(directory)
    config = artefact.config(meta)
    try:
      model = eercl.create_model(config.model)
    except ConfigError as e:   # names config.model.x: say which file holds it
      raise CheckpointError(f"{os.path.join(directory, artefact.MANIFEST)}: {e}") from None
    variables = parallel.replicate(artefact.read_variables(directory, meta, model), mesh)
    step = meta.get("source", {}).get("step")
    batch_size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    exported = True
  else:
    directory, step = resolve_checkpoint(path, which, what)
    meta = checkpoints.read_meta_at(directory, step)
    if "config" not in meta:
      raise CheckpointError(f"{directory} step {step}: the checkpoint's metadata holds no config")
    config = ml_collections.ConfigDict(meta["config"])
    config.data.class_names = tuple(config.data.class_names)
    model = eercl.create_model(config.model)
    variables, _ = checkpoints.restore_variables(directory, model, config.data.crop,
                                                 parallel.replicated(mesh), step=step)
    batch_size = config.eval_batch_size if batch_size is None else batch_size
    exported = False
  devices = mesh.devices.size
  loader = dataclasses.replace(pipelines.Loader.from_config(config.data),
                               num_workers=num_workers)
  evaluator = evaluation.Evaluator(model, pipelines.Normalization.from_config(config.data), mesh,
                                   loader, -(-int(batch_size) // devices) * devices,
                                   config.data.class_names)
  logging.info("loaded %s step %s (%s)", directory, step,
               "exported model" if exported else f"{meta.get('stage')} stage")
  return Loaded(directory, step, meta, config, model, variables, evaluator, exported)


# ----------------------------------------------------------------------------------------------
# --config.mode=eval

def parse_lists(spec: str) -> dict[str, str]:
  """'a.txt,name=b.txt' -> {'a': 'a.txt', 'name': 'b.txt'} (a name defaults to the file's
  name without .txt)."""
  out = {}
  for item in (s.strip() for s in spec.split(",")):
    if not item:
      continue
    name, sep, path = item.partition("=")
    if not sep:
      name, path = os.path.splitext(os.path.basename(item))[0], item
    if not name or not path:
      raise ConfigError(f"config.eval.lists: {item!r} is not '[name=]path/to/list.txt'")
    if name in out:
      raise ConfigError(f"config.eval.lists: the name {name!r} is given twice (write "
                        "name=path)")
    out[name] = path
  if not out:
    raise ConfigError(f"config.eval.lists: {spec!r} names no list")
  return out


def _effective_config(config, stored) -> ml_collections.ConfigDict:
  """The given config with the model and the view fields of the checkpoint's config."""
  c = ml_collections.ConfigDict(config.to_dict())
  diffs = []
  given_model = checkpoints.config_json(config.model)
  stored_model = checkpoints.config_json(stored.model)
  for k in sorted(set(given_model) | set(stored_model)):
    if given_model.get(k) != stored_model.get(k):
      diffs.append(f"model.{k}: config {given_model.get(k)!r}, checkpoint {stored_model.get(k)!r}")
  c.model = ml_collections.ConfigDict(stored.model.to_dict())
  for k in _VIEW_KEYS:
    given, have = config.data[k], stored.data[k]
    if list(np.ravel(given)) != list(np.ravel(have)):
      diffs.append(f"data.{k}: config {given!r}, checkpoint {have!r}")
    c.data[k] = tuple(have) if isinstance(have, (list, tuple)) else have
  if diffs:
    logging.warning("the checkpoint's model and view settings are used, not the config's:\n  %s",
                    "\n  ".join(diffs))
  return c


def evaluation_document(loaded: Loaded, results: dict[str, dict],
                        list_paths: dict[str, str]) -> dict:
  names = list(loaded.class_names)
  out = {"checkpoint": os.path.abspath(loaded.directory), "step": loaded.step,
         "stage": loaded.stage, "class_names": names,
         "confusion_convention": CONFUSION_CONVENTION, "lists": {}}
  for name, r in results.items():
    per = {c: (None if np.isnan(a) else float(a)) for c, a in zip(names, r["per_class_accuracy"])}
    out["lists"][name] = {"list": os.path.abspath(list_paths[name]), "count": r["count"],
                          "accuracy": r["accuracy"],
                          "mean_class_accuracy": r["mean_class_accuracy"],
                          "per_class_accuracy": per, "confusion": r["confusion"].tolist()}
  return out


def format_confusion(confusion: np.ndarray, class_names) -> str:
  """A text table, rows = true class, columns = predicted."""
  names = [str(c) for c in class_names]
  width = max(max(len(n) for n in names), len(str(int(np.max(confusion, initial=0)))), 4)
  head = " " * width + " | " + " ".join(n[:width].rjust(width) for n in names)
  rows = [f"{n.rjust(width)} | " + " ".join(str(int(v)).rjust(width) for v in row)
          for n, row in zip(names, confusion)]
  return "\n".join(["true \\ predicted", head, "-" * len(head), *rows])


def evaluate_checkpoint(config, workdir: str) -> dict:
  """`--config.mode=eval`: scores the checkpoint `config.eval.checkpoint` (checkpoints.WHICH of
  `workdir`, or a folder) on `config.eval.lists` (default `config.data.eval_lists`); prints the
  metrics and confusion matrices and writes them as JSON. Returns the JSON document."""
  mesh = parallel.create_mesh()
  config_defaults.validate(config, mesh.devices.size, jax.process_count())
  spec = config.eval.checkpoint
  if spec in checkpoints.WHICH:
    loaded = load(workdir, spec, what=f"--workdir (config.eval.checkpoint={spec!r})", mesh=mesh)
  else:
    loaded = load(spec, "auto", what="config.eval.checkpoint", mesh=mesh)
  c = _effective_config(config, loaded.config)
  if config.eval.lists:
    list_paths = parse_lists(config.eval.lists)
  else:   # the run's own evaluation lists, the target first
    list_paths = dict(sorted(c.data.eval_lists.items(), key=lambda kv: kv[0] != "target"))
  c.data.format = "folder"   # eval mode reads the lists' image files
  # The class names are the checkpoint's: a list of another class order is refused by name.
  evals = {name: run_lists.read_list(path, c.data,
                                     names_from="the checkpoint's config.data.class_names")
           for name, path in list_paths.items()}
  evaluator = evaluation.Evaluator.from_config(c, loaded.model, mesh)
  results = evaluator.evaluate(loaded.variables, evals)
  document = evaluation_document(loaded, results, list_paths)
  output = config.eval.output or os.path.join(
      workdir, "eval", f"{os.path.basename(os.path.normpath(loaded.directory))}_step"
      f"{loaded.step}.json")
  lines = [f"checkpoint {loaded.directory} step {loaded.step} ({document['stage']} stage, "
           f"{loaded.selection})"]
  for name, r in results.items():
    lines.append(evaluation.format_metrics(name, r, c.data.class_names))
    lines.append(format_confusion(r["confusion"], c.data.class_names))
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w", encoding="utf-8") as f:
      json.dump(document, f, indent=2)
    lines.append(f"written to {output}")
    print("\n".join(lines), flush=True)
  return document


# ----------------------------------------------------------------------------------------------
# Prediction of image files (python -m eercl_jax.predict)

def predict_images(checkpoint: str, inputs: Sequence[str], which: str = "auto",
                   batch_size: int | None = None, num_workers: int = 0) -> dict:
  """Class and probabilities of the image files of `inputs` (files and folders, see
  `images.find_images`) with the model of `checkpoint` (anything `load` takes) through its own
  test view; every image is decoded before the model loads, so an unreadable one is an error
  naming it. Returns {"checkpoint", "step", "class_names", "predictions": [{"path", "class",
  "index", "probabilities": {class: p}}]}."""
  paths = images.find_images(inputs)
  problems = images.check_images([os.path.abspath(p) for p in paths], "decode")
  bad = [f"{p}: {why}" for p, why in zip(paths, problems) if why is not None]
  if bad:
    raise DataError(f"{len(bad)} unreadable image(s):\n  " + "\n  ".join(bad[:20]))
  loaded = load(checkpoint, which, what="--checkpoint", batch_size=batch_size,
                num_workers=num_workers)
  predictions = [{"path": path, **p} for path, p in zip(paths, loaded.predict(paths))]
  return {"checkpoint": os.path.abspath(loaded.directory), "step": loaded.step,
          "selection": loaded.selection, "class_names": list(loaded.class_names),
          "predictions": predictions}
