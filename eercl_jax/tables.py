"""Results tables over seeds, from the runs' results.json files (eercl_jax/records.py); the
command is `python -m eercl_jax.summarize` (eercl_jax/tools/summarize.py). No jax here: the
tables are made on any machine.

The paper's layout (`paper_*`): one row per adaptation method (and per variant of a method, an
ablation), one column per target, each cell the mean ± sample standard deviation (ddof=1) over
seeds, in percent, of the target accuracy of the checkpoint a selection rule picks (`oracle`:
best target accuracy, uses target labels; `im`, `snd`: label-free scores; `last`: the last
step), and a Mean column: the mean over the targets of the per-target means ('–' when a row
lacks a target). A `source_only` row comes first: the adaptation runs' source-only accuracy
(one value per source, target and seed), or the runs of method source_only where there are any.
A run's labels come from its results.json ("method", "variant"), the sweep's record in its
folder (sweep_run.json: source, target, method, variant, seed) and, failing those, its folder
name `<src>2<tgt>[_<method>][-<variant>]_seed<k>` (a run that names no method is EERCL's, the
configs' own before the `method` key). Rows and columns are in the order the runs are given
(the sweep gives them in its grid's order), variants after their method. With more than one
source the columns are the pairs `<src>2<tgt>`.

The per-group table (`aggregate`, `markdown`, `csv_text`): runs are grouped by their folder
name without a trailing `_seed<k>` (runs/raf2expw_seed1..3 form the group raf2expw); for each
group and evaluation list (the target first) the mean ± std of the source-only, adapted (last
step) and best-step accuracy and mean class accuracy, with the number of runs n and their seeds.

A run folder without results.json (unfinished or failed) or with an unreadable one is listed as
missing, not an error.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
from typing import Optional, Sequence

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


# ------------------------------------------------------------------------ the paper's layout

RULES = ("oracle", "im", "snd", "last")
RULE_TEXT = {"oracle": "the checkpoint of best target accuracy (oracle: uses target labels)",
             "im": "the checkpoint the IM score selects (label-free)",
             "snd": "the checkpoint the SND score selects (label-free)",
             "last": "the last step"}
METRIC_TEXT = {"accuracy": "Accuracy", "mean_class_accuracy": "Mean class accuracy"}
SOURCE_ONLY = "source_only"
DEFAULT_METHOD = "eercl"     # a run that names no method: the configs' own before `method`
_NAMES = re.compile(r"^(?P<group>.+?)(?:_seed(?P<seed>\d+))?$")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One adaptation run, as the paper's layout sees it."""
  run_dir: str
  source: str
  target: str
  method: str
  variant: Optional[str]
  seed: Optional[int]
  value: Optional[float]          # the selected checkpoint's metric (a fraction), None: absent
  source_only: Optional[float]
  uses_target_labels: bool


def _read_record(run_dir: str) -> dict:
  try:
    with open(os.path.join(run_dir, constants.SWEEP_RUN_FILE), encoding="utf-8") as f:
      record = json.load(f)
    return record if isinstance(record, dict) else {}
  except (OSError, ValueError):
    return {}


def labels(run_dir: str, results: dict) -> dict:
  """{source, target, method, variant, seed} of a run: from results.json, the sweep's record,
  then the folder name."""
  record = _read_record(run_dir)
  name = _NAMES.match(os.path.basename(os.path.normpath(run_dir)))
  method = results.get("method") or record.get("method")
  variant = results.get("variant") if "variant" in results else record.get("variant")
  source, target = record.get("source"), record.get("target")
  if not (source and target):
    source, _, rest = name.group("group").partition("2")
    if not rest:
      source, rest = "", name.group("group")
    if variant and rest.endswith(f"-{variant}"):
      rest = rest[:-len(variant) - 1]
    if method and rest.endswith(f"_{method}"):
      rest = rest[:-len(method) - 1]
    elif not method:   # the folder name alone: <tgt>[_<method>][-<variant>]
      if variant is None and "-" in rest:
        rest, variant = rest.rsplit("-", 1)
      for known in ("source_only", "tent", "shot", "nrc", "aad", "eercl"):
        if rest.endswith(f"_{known}"):
          rest, method = rest[:-len(known) - 1], known
          break
    target = rest
  seed = results.get("seed", record.get("seed"))
  if seed is None and name.group("seed"):
    seed = int(name.group("seed"))
  return {"source": source, "target": target, "method": method or DEFAULT_METHOD,
          "variant": variant or None, "seed": seed}


def _target_list(results: dict) -> Optional[str]:
  lists = results["lists"]
  if isinstance(lists.get("target"), dict) and lists["target"].get("role", "target") == "target":
    return "target"
  return next((n for n, e in lists.items() if isinstance(e, dict) and e.get("role") == "target"),
              None)


def _number(entry, metric: str) -> Optional[float]:
  if not isinstance(entry, dict) or entry.get(metric) is None:
    return None
  value = float(entry[metric])
  return None if math.isnan(value) else value


def selected(results: dict, list_name: str, rule: str,
             metric: str = "accuracy") -> tuple[Optional[float], bool]:
  """(the metric of `list_name` at the checkpoint `rule` picks, whether that rule uses target
  labels). results.json files from before "selections" know the last step and, when their
  best checkpoint was the oracle's, that one; other rules are None there."""
  selections = results.get("selections")
  if isinstance(selections, dict) and isinstance(selections.get(rule), dict):
    chosen = selections[rule]
    lists = chosen.get("lists") if isinstance(chosen.get("lists"), dict) else {}
    return (_number(lists.get(list_name), metric),
            bool(chosen.get("uses_target_labels", rule == "oracle")))
  entry = results["lists"].get(list_name) or {}
  if rule == "last":
    return _number(entry.get("last"), metric), False
  if rule == "oracle" and "oracle" in str(results.get("selection", "")).lower():
    return _number(entry.get("best"), metric), True
  return None, rule == "oracle"


def paper_entries(found: list[tuple[str, dict]], rule: str = "last", metric: str = "accuracy"
                  ) -> tuple[list[Entry], list[tuple[str, str]]]:
  """(the adaptation runs' entries, [(run_dir, why it is not in the table)])."""
  if rule not in RULES:
    raise ValueError(f"selection rule {rule!r}: expected one of {RULES}")
  entries, left = [], []
  for run_dir, results in found:
    if results.get("stage") == "source":
      left.append((run_dir, "a source run (see --layout=groups)"))
      continue
    list_name = _target_list(results)
    if list_name is None:
      left.append((run_dir, "no evaluation list with the role 'target'"))
      continue
    lab = labels(run_dir, results)
    value, uses_labels = selected(results, list_name, rule, metric)
    source_only = _number(results["lists"][list_name].get("source_only"), metric)
    entries.append(Entry(run_dir, lab["source"], lab["target"], lab["method"], lab["variant"],
                         lab["seed"], value, source_only, uses_labels))
  return entries, left


@dataclasses.dataclass
class PaperTable:
  rule: str
  metric: str
  columns: list[str]                          # column labels (targets, or <src>2<tgt> pairs)
  rows: list[tuple[str, Optional[str]]]       # (method, variant)
  cells: dict                                 # (row, column) -> (mean %, std %, n)
  means: dict                                 # row -> mean % over the columns (NaN: a gap)
  uses_target_labels: bool

  @staticmethod
  def row_label(row: tuple[str, Optional[str]]) -> str:
    method, variant = row
    return f"{method}-{variant}" if variant else method


def paper_table(entries: Sequence[Entry], rule: str = "last",
                metric: str = "accuracy") -> PaperTable:
  pairs: list[tuple[str, str]] = []
  for e in entries:
    if (e.source, e.target) not in pairs:
      pairs.append((e.source, e.target))
  one_source = len({s for s, _ in pairs}) <= 1
  column = {p: (p[1] if one_source else f"{p[0]}2{p[1]}") for p in pairs}
  values: dict = {}
  for e in entries:
    values.setdefault((e.method, e.variant), {}).setdefault(column[(e.source, e.target)], [])
    if e.value is not None:
      values[(e.method, e.variant)][column[(e.source, e.target)]].append(100.0 * e.value)
  if not any(e.method == SOURCE_ONLY for e in entries):
    seen, derived = set(), {}
    for e in entries:   # the same source checkpoint for every method of a seed: counted once
      key = (e.source, e.target, e.seed)
      if e.source_only is not None and key not in seen:
        seen.add(key)
        derived.setdefault(column[(e.source, e.target)], []).append(100.0 * e.source_only)
    if derived:
      values[(SOURCE_ONLY, None)] = derived
  methods = [m for m in dict.fromkeys(m for m, _ in values)]
  variants = [v for v in dict.fromkeys(v for _, v in values) if v is not None]
  rows = sorted(values, key=lambda r: (r[0] != SOURCE_ONLY, methods.index(r[0]),
                                       r[1] is not None, variants.index(r[1]) if r[1] else 0))
  columns = list(dict.fromkeys(column.values()))
  cells, means = {}, {}
  for row in rows:
    for col in columns:
      cells[(row, col)] = mean_std(values[row].get(col, [])) + (len(values[row].get(col, [])),)
    per_column = [cells[(row, col)][0] for col in columns]
    means[row] = (math.nan if not per_column or any(math.isnan(m) for m in per_column)
                  else sum(per_column) / len(per_column))
  return PaperTable(rule, metric, columns, rows, cells, means,
                    any(e.uses_target_labels for e in entries) or rule == "oracle")


def _paper_cells(table: PaperTable, pm: str, dash: str) -> list[list[str]]:
  """The rows' cells as text: 'mean ± std', ' (n=k)' where a cell has fewer seeds than the
  table's fullest one."""
  most = max((c[2] for c in table.cells.values()), default=0)
  out = []
  for row in table.rows:
    cells = []
    for col in table.columns:
      mean, std, n = table.cells[(row, col)]
      text = dash if n == 0 else (f"{mean:.2f} {pm} {dash}" if math.isnan(std)
                                  else f"{mean:.2f} {pm} {std:.2f}")
      cells.append(text + (f" (n={n})" if 0 < n < most else ""))
    mean = table.means[row]
    out.append(cells + [dash if math.isnan(mean) else f"{mean:.2f}"])
  return out


def paper_note(table: PaperTable) -> str:
  return (f"{METRIC_TEXT.get(table.metric, table.metric)} (%) on each target at "
          f"{RULE_TEXT[table.rule]}: mean ± sample standard deviation (ddof=1) over seeds; (n=k): "
          f"fewer seeds than the other cells; Mean: the mean over the targets of the per-target "
          f"means ('–' when a target is missing). source_only: the source model before "
          f"adaptation.")


def paper_markdown(table: PaperTable, missing: Sequence[tuple[str, str]],
                   left: Sequence[tuple[str, str]] = ()) -> str:
  lines = [f"_{paper_note(table)}_", ""]
  header = ["method", *table.columns, "Mean"]
  lines.append("| " + " | ".join(header) + " |")
  lines.append("|" + "|".join("---" for _ in header) + "|")
  for row, cells in zip(table.rows, _paper_cells(table, "±", "–")):
    lines.append("| " + " | ".join([table.row_label(row), *cells]) + " |")
  if table.uses_target_labels:
    lines += ["", f"Selection '{table.rule}' uses target labels: not a source-free result."]
  if left:
    lines += ["", f"Not in this table ({len(left)}):"]
    lines += [f"- {d}: {why}" for d, why in left]
  if missing:
    lines += ["", f"Missing or unfinished runs ({len(missing)}):"]
    lines += [f"- {d}: {why}" for d, why in missing]
  return "\n".join(lines)


def paper_csv(table: PaperTable) -> str:
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(["row", "method", "variant"]
             + [f"{c}_{k}" for c in table.columns for k in ("mean_pct", "std_pct", "n")]
             + ["mean_pct"])
  fmt = lambda v: "" if math.isnan(v) else f"{v:.4f}"
  for row in table.rows:
    cells = []
    for col in table.columns:
      mean, std, n = table.cells[(row, col)]
      cells += [fmt(mean), fmt(std), n]
    w.writerow([table.row_label(row), row[0], row[1] or ""] + cells + [fmt(table.means[row])])
  return buf.getvalue()


_LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                   "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                   "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
  return "".join(_LATEX_SPECIALS.get(ch, ch) for ch in str(text))


def paper_latex(table: PaperTable) -> str:
  """A plain tabular (no packages needed), to \\input into the paper."""
  note = paper_note(table).replace("±", "+/-").replace("–", "-")
  lines = [f"% {note}"]
  if table.uses_target_labels:
    lines.append(f"% Selection '{table.rule}' uses target labels.")
  lines.append("\\begin{tabular}{l" + "c" * (len(table.columns) + 1) + "}")
  lines.append("\\hline")
  lines.append(" & ".join(["Method", *map(latex_escape, table.columns), "Mean"]) + " \\\\")
  lines.append("\\hline")
  for row, cells in zip(table.rows, _paper_cells(table, "$\\pm$", "--")):
    # The cells are numbers, $\pm$, -- and (n=k): nothing to escape.
    lines.append(" & ".join([latex_escape(table.row_label(row)), *cells]) + " \\\\")
  lines.append("\\hline")
  lines.append("\\end{tabular}")
  return "\n".join(lines) + "\n"
