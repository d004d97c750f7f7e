"""Results tables over seeds, from the runs' results.json files (eercl_jax/records.py); the
command is `python -m eercl_jax.summarize` (eercl_jax/tools/summarize.py).

Runs are grouped by their folder name without a trailing `_seed<k>` (runs/raf2expw_seed1..3 form
the group raf2expw). For each group and evaluation list (the target first) the table gives the
mean ± sample standard deviation (ddof=1) over the group's runs, in percent, of the source-only,
adapted (last step) and best-step accuracy and mean class accuracy, with the number of runs n
and their seeds. A run folder without results.json (unfinished or failed) or with an unreadable
one is listed as missing, not an error. No jax here: the table is made on any machine.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from typing import Sequence

from eercl_jax import constants

_SEED_SUFFIX = re.compile(r"_seed\d+$")
# (column label, results.json entry, key); accuracies are fractions there, percent here.
METRICS = (("source-only acc", "source_only", "accuracy"),
           ("source-only MCA", "source_only", "mean_class_accuracy"),
           ("adapted acc", "last", "accuracy"),
           ("adapted MCA", "last", "mean_class_accuracy"),
           ("best-step acc", "best", "accuracy"),
           ("best-step MCA", "best", "mean_class_accuracy"))
HEADER_NOTE = (
    "Mean ± sample standard deviation (ddof=1) over the n runs of each group (seeds listed), in %. "
    "MCA = mean class accuracy. Adapted = the model at the last step (for a source run: the "
    "trained model); best-step = the checkpoint picked by the run's selection rule (see below); "
    "'–' = not available (no source-only evaluation, or n = 1 for a std).")


def group_name(run_dir: str) -> str:
  return _SEED_SUFFIX.sub("", os.path.basename(os.path.normpath(run_dir)))


def load_runs(run_dirs: Sequence[str]) -> tuple[list[tuple[str, dict]], list[tuple[str, str]]]:
  """([(run_dir, results)], [(run_dir, why missing)])."""
  found, missing = [], []
  for run_dir in run_dirs:
    path = os.path.join(run_dir, constants.RESULTS_FILE)
    if not os.path.isdir(run_dir):
      missing.append((run_dir, "no such folder"))
    elif not os.path.isfile(path):
      missing.append((run_dir, "unfinished: no results.json"))
    else:
      try:
        with open(path, encoding="utf-8") as f:
          results = json.load(f)
        if not isinstance(results.get("lists"), dict):
          raise ValueError("no 'lists' entry")
      except (OSError, ValueError, AttributeError) as e:
        missing.append((run_dir, f"unreadable results.json ({e})"))
        continue
      found.append((run_dir, results))
  return found, missing


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof=1; NaN for fewer than two values)."""
  n = len(values)
  if n == 0:
    return math.nan, math.nan
  mean = sum(values) / n
  if n < 2:
    return mean, math.nan
  return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def aggregate(found: list[tuple[str, dict]]) -> list[dict]:
  """One row per (group, list): group, list, role, n, seeds, selection and
  {metric label: (mean %, std %)}."""
  groups: dict[str, list[tuple[str, dict]]] = {}
  for run_dir, results in found:
    groups.setdefault(group_name(run_dir), []).append((run_dir, results))
  rows = []
  for group, runs in groups.items():
    names: list[str] = []
    roles: dict[str, str] = {}
    for _, results in runs:
      for name, entry in results["lists"].items():
        if name not in names:
          names.append(name)
          roles[name] = entry.get("role", name)
    names.sort(key=lambda n: roles[n] != "target")   # stable: the runs' order otherwise
    selections = sorted({str(r.get("selection")) for _, r in runs})
    for name in names:
      have = [(d, r) for d, r in runs if name in r["lists"]]
      row = {"group": group, "list": name, "role": roles[name], "n": len(have),
             "seeds": [r.get("seed") for _, r in have], "selection": "; ".join(selections),
             "stats": {}}
      for label, entry, key in METRICS:
        values = [100.0 * float(r["lists"][name][entry][key]) for _, r in have
                  if r["lists"][name].get(entry) is not None
                  and r["lists"][name][entry].get(key) is not None]
        values = [v for v in values if not math.isnan(v)]
        row["stats"][label] = mean_std(values) + (len(values),)
      rows.append(row)
  return rows


def _cell(mean: float, std: float, count: int) -> str:
  if count == 0 or math.isnan(mean):
    return "–"
  return f"{mean:.2f} ± –" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def markdown(rows: list[dict], missing: list[tuple[str, str]]) -> str:
  lines = [f"_{HEADER_NOTE}_", ""]
  header = ["group", "list", "role", "n", "seeds", *(m[0] for m in METRICS)]
  lines.append("| " + " | ".join(header) + " |")
  lines.append("|" + "|".join("---" for _ in header) + "|")
  for r in rows:
    cells = [r["group"], r["list"], r["role"], str(r["n"]),
             ",".join(str(s) for s in r["seeds"]),
             *(_cell(*r["stats"][m[0]]) for m in METRICS)]
    lines.append("| " + " | ".join(cells) + " |")
  selections = {}
  for r in rows:
    selections.setdefault(r["group"], r["selection"])
  if selections:
    lines += ["", "Best-step selection:"]
    lines += [f"- {g}: {s}" for g, s in selections.items()]
  if missing:
    lines += ["", f"Missing or unfinished runs ({len(missing)}):"]
    lines += [f"- {d}: {why}" for d, why in missing]
  return "\n".join(lines)


def csv_text(rows: list[dict]) -> str:
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  slug = lambda label: label.replace("-", "_").replace(" ", "_").lower()
  w.writerow(["group", "list", "role", "n", "seeds"]
             + [f"{slug(m[0])}_{s}_pct" for m in METRICS for s in ("mean", "std")])
  fmt = lambda v: "" if math.isnan(v) else f"{v:.4f}"
  for r in rows:
    w.writerow([r["group"], r["list"], r["role"], r["n"], " ".join(str(s) for s in r["seeds"])]
               + [fmt(v) for m in METRICS for v in r["stats"][m[0]][:2]])
  return buf.getvalue()
