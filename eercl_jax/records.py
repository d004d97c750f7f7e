"""Run records: what a run writes about itself so that it can be found, compared and summarised.

At start (process 0):
  WORKDIR/config.json  - the resolved config (rewritten at each start: a resume may change
                         cadences or paths, and the file then shows what the run used last);
  logs/train.log       - the same config, as text;
  TensorBoard hparams  - the config flattened to scalar values (`hparams` below).
At the end:
  WORKDIR/results.json - accuracies per evaluation list (source-only, best, last), the steps,
                         the selection rule, wall time, devices and versions (`results`).

results.json (accuracies are fractions in 0..1):

  {"stage": "source" | "adapt", "seed": int, "config_file": str | null, "workdir": str,
   "method": str | null (the adaptation's method), "selection": str, "best_step": int,
   "last_step": int,
   "lists": {<eval list name>: {"role": "target" | "source_test" | "source_train" | <name>,
                                "source_only": {"accuracy", "mean_class_accuracy"} | null,
                                "best": {"accuracy", "mean_class_accuracy"},
                                "last": {"accuracy", "mean_class_accuracy"}}},
   "selections": {<rule>: {"step": int, "value": float | null, "folder": str,
                           "uses_target_labels": bool,
                           "lists": {<name>: {"accuracy", "mean_class_accuracy"}}}},
       rules: the run's own (config.data.select_by: best/), an adaptation's others ('oracle' =
       target accuracy, 'im', 'snd': best_<rule>/) and 'last' (checkpoints/);
   "evaluations": [{"step": int, <rule>: value, ...}] - every evaluation's selection values,
   "wall_time_s": float, "devices": {"count": int, "kind": str},
   "versions": {"jax": str, "flax": str, "eercl_jax": str | null}}

`python -m eercl_jax.summarize` reads these files.
"""
from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import subprocess
from typing import Any, Mapping

import jax

from eercl_jax import constants

# The --config file of the current process (set by eercl_jax.main; None for runs started from
# Python), recorded in results.json.
_config_file: str | None = None


def set_config_file(path: str | None) -> None:
  global _config_file  # pylint: disable=global-statement
  _config_file = os.path.abspath(path) if path else None


def config_file() -> str | None:
  return _config_file


def config_dict(config) -> dict:
  """The config as plain JSON data (tuples become lists), as checkpoints record it."""
  from eercl_jax import checkpoints  # pylint: disable=import-outside-toplevel
  return checkpoints.config_json(config)


def _write_json(path: str, data: Any) -> None:
  """Written to a temporary name and renamed: a reader never sees half a file."""
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=2, sort_keys=False, allow_nan=True)
    f.write("\n")
  os.replace(tmp, path)


def write_config(workdir: str, config) -> str:
  path = os.path.join(workdir, constants.CONFIG_FILE)
  if jax.process_index() == 0:
    _write_json(path, config_dict(config))
  return path


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def hparams(config) -> dict[str, bool | int | float | str]:
  """The config flattened to the scalar types TensorBoard's hparams plugin accepts: numbers and
  booleans as they are, everything else (tuples, lists, None) as its text."""
  out = {}
  for k, v in flatten(config_dict(config)).items():
    out[k] = v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
  return out


def role_of(name: str, list_path: str, config) -> str:
  """What an evaluation list is to the run: the target, the source test set, the training
  list, or (any other list) its own name."""
  if name == "target":
    return "target"
  if config.stage == "source" and os.path.abspath(list_path) == \
      os.path.abspath(config.data.train_list):
    return "source_train"
  if name == "source":
    return "source_test"
  return name


def scores(summary: Mapping | None) -> dict | None:
  """{'accuracy', 'mean_class_accuracy'} of an evaluation summary (`evaluation.summarize`):
  what a run keeps of each evaluation; None stays None."""
  if summary is None:
    return None
  return {"accuracy": float(summary["accuracy"]),
          "mean_class_accuracy": float(summary["mean_class_accuracy"])}


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str | None]:
  import flax  # pylint: disable=import-outside-toplevel
  here = os.path.dirname(os.path.abspath(__file__))
  code = None
  # The commit of a clone (run in place or `pip install -e .`); an installed copy (`pip install
  # .`) says its package version instead: a git folder around site-packages (a venv inside some
  # repository) is not the code's.
  if os.path.exists(os.path.join(os.path.dirname(here), ".git")):
    try:
      describe = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=here,
                                capture_output=True, text=True, timeout=10, check=True)
      code = describe.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
      pass
  if code is None:
    try:
      dist = importlib.metadata.distribution("eercl-jax")
      if os.path.dirname(os.path.abspath(dist.locate_file("eercl_jax/__init__.py"))) == here:
        code = f"{dist.version} (installed)"
    except importlib.metadata.PackageNotFoundError:
      pass
  return {"jax": jax.__version__, "flax": flax.__version__, "eercl_jax": code}


def devices(mesh) -> dict:
  devs = list(mesh.devices.flat)
  return {"count": len(devs), "kind": devs[0].device_kind if devs else "none"}


def results(config, workdir: str, *, selection: str, best_step: int, last_step: int,
            best: Mapping[str, Mapping] | None, last: Mapping[str, Mapping],
            source_only: Mapping[str, Mapping] | None, wall_time_s: float, mesh,
            selections: Mapping[str, Mapping] | None = None,
            history: list | None = None) -> dict:
  """The results.json document (schema in the module docstring). `best`, `last`, `source_only`
  map list names to evaluation summaries or their `scores`."""
  lists = {}
  for name, path in config.data.eval_lists.items():
    lists[name] = {
        "role": role_of(name, path, config),
        "source_only": scores((source_only or {}).get(name)),
        "best": scores((best or {}).get(name)),
        "last": scores(last.get(name)),
    }
  # The target first: it is what a table of a domain-adaptation run is about.
  lists = dict(sorted(lists.items(), key=lambda kv: kv[1]["role"] != "target"))
  return {
      "stage": config.stage, "method": config.method if config.stage == "adapt" else None,
      "seed": int(config.seed), "config_file": config_file(),
      "workdir": os.path.abspath(workdir), "selection": selection, "best_step": int(best_step),
      "last_step": int(last_step), "lists": lists,
      "selections": dict(selections or {}), "evaluations": list(history or []),
      "wall_time_s": float(wall_time_s), "devices": devices(mesh), "versions": versions(),
  }


def write_results(workdir: str, document: dict) -> str:
  path = os.path.join(workdir, constants.RESULTS_FILE)
  if jax.process_index() == 0:
    _write_json(path, document)
  return path


def read_results(run_dir: str) -> dict:
  """results.json of a run folder; FileNotFoundError when the run has not finished."""
  path = os.path.join(run_dir, constants.RESULTS_FILE)
  with open(path, encoding="utf-8") as f:
    return json.load(f)
