"""Results tables (`python -m eercl_jax.summarize`, eercl_jax/tables.py) on hand-written
results.json files: the paper's layout (methods and variants by targets, mean ± std over seeds,
a Mean column, any selection rule; Markdown, CSV, LaTeX) and the per-group table."""
import csv
import glob
import json
import os
import re
import statistics

import pytest

from eercl_jax import tables
from eercl_jax.tools import summarize

RULES = ("oracle", "im", "snd", "last")
# What a selection rule adds to a run's accuracy in the files below (each rule a distinct value).
RULE_OFFSET = {"oracle": 0.05, "im": 0.03, "snd": 0.02, "last": 0.0}


def _pair(acc, mca=None):
  return {"accuracy": acc, "mean_class_accuracy": acc - 0.1 if mca is None else mca}


def _adapt_results(method, target, seed, variant=None, schema="new"):
  """A results.json of an adaptation run: accuracies are a function of (method, target, seed),
  the source-only accuracy of (target, seed) only (the same source checkpoint for every
  method)."""
  base = {"tent": 0.50, "eercl": 0.60}[method] + {"ck": 0.0, "jaffe": 0.10}[target]
  base += 0.01 * seed * seed + (0.04 if variant else 0.0)
  source_only = {"ck": 0.30, "jaffe": 0.40}[target] + 0.02 * seed
  doc = {"stage": "adapt", "seed": seed, "config_file": None, "workdir": "x",
         "selection": "best target accuracy (oracle selection: uses target labels)",
         "best_step": 10, "last_step": 12,
         "lists": {"target": {"role": "target", "source_only": _pair(source_only),
                              "best": _pair(base + RULE_OFFSET["oracle"]),
                              "last": _pair(base)},
                   "source": {"role": "source_test", "source_only": _pair(0.9),
                              "best": _pair(0.8), "last": _pair(0.85)}},
         "wall_time_s": 1.0, "devices": {"count": 1, "kind": "cpu"},
         "versions": {"jax": "x", "flax": "y", "eercl_jax": None}}
  if schema == "new":
    doc["method"], doc["variant"] = method, variant
    doc["selections"] = {
        rule: {"step": 12, "uses_target_labels": rule == "oracle",
               "lists": {"target": _pair(base + off), "source": _pair(0.8)}}
        for rule, off in RULE_OFFSET.items()}
  return doc, base, source_only


def _write(run_dir, doc=None, record=None):
  os.makedirs(run_dir, exist_ok=True)
  if doc is not None:
    with open(os.path.join(run_dir, "results.json"), "w", encoding="utf-8") as f:
      f.write(doc if isinstance(doc, str) else json.dumps(doc))
  if record is not None:
    with open(os.path.join(run_dir, "sweep_run.json"), "w", encoding="utf-8") as f:
      json.dump(record, f)


@pytest.fixture
def grid_runs(tmp_path):
  """2 methods x 2 targets x 3 seeds, eercl->jaffe seed 3 unfinished, plus an eercl variant on
  ck. tent's runs carry the sweep's record (sweep_run.json), eercl's do not (labels from
  results.json and the folder name). Returns (run folders, {(row, target): [accuracy by seed]},
  {target: [source-only accuracy by seed]})."""
  root = tmp_path / "runs"
  expected, source_only = {}, {}
  dirs = []
  for target in ("ck", "jaffe"):
    for method, variant in (("tent", None), ("eercl", None), ("eercl", "no_nce")):
      if variant and target == "jaffe":
        continue
      row = method + (f"-{variant}" if variant else "")
      for seed in (1, 2, 3):
        run = str(root / f"raf2{target}_{row}_seed{seed}")
        dirs.append(run)
        if (method, target, seed, variant) == ("eercl", "jaffe", 3, None):
          os.makedirs(run)   # unfinished: no results.json
          continue
        doc, acc, so = _adapt_results(method, target, seed, variant)
        record = ({"name": os.path.basename(run), "stage": "adapt", "source": "raf",
                   "target": target, "method": method, "variant": variant, "seed": seed,
                   "argv": ["py"]} if method == "tent" else None)
        _write(run, doc, record)
        expected.setdefault((row, target), []).append(acc)
        source_only.setdefault(target, {})[seed] = so
  return dirs, expected, {t: [v[s] for s in sorted(v)] for t, v in source_only.items()}


def _cell(values):
  pct = [100 * v for v in values]
  return f"{statistics.mean(pct):.2f} ± {statistics.stdev(pct):.2f}"


def _md_rows(md):
  rows = {}
  for line in md.splitlines():
    if line.startswith("| ") and not line.startswith("| method"):
      cells = [c.strip() for c in line.strip().strip("|").split("|")]
      rows[cells[0]] = cells[1:]
  return rows


def test_paper_layout_means_stds_and_mean_column(grid_runs, tmp_path, capsys):
  dirs, expected, source_only = grid_runs
  out = tmp_path / "table"
  assert summarize.main([f"--out={out}", *dirs]) == 0   # the paper's layout, last step
  md = capsys.readouterr().out
  assert md.strip() == (tmp_path / "table.md").read_text().strip()
  header = next(l for l in md.splitlines() if l.startswith("| method"))
  assert [c.strip() for c in header.strip("|").split("|")] == ["method", "ck", "jaffe", "Mean"]
  rows = _md_rows(md)
  assert list(rows) == ["source_only", "tent", "eercl", "eercl-no_nce"]
  for row in ("tent", "eercl"):
    ck, jaffe = expected[(row, "ck")], expected[(row, "jaffe")]
    assert rows[row][0] == _cell(ck)
    assert rows[row][1] == _cell(jaffe) + (" (n=2)" if row == "eercl" else "")
    mean = statistics.mean([statistics.mean(ck), statistics.mean(jaffe)]) * 100
    assert rows[row][2] == f"{mean:.2f}"
  assert len(expected[("eercl", "jaffe")]) == 2
  # The source-only row: one value per (target, seed), whatever the number of methods.
  assert rows["source_only"][:2] == [_cell(source_only["ck"]), _cell(source_only["jaffe"])]
  # A row without every target has no mean.
  assert rows["eercl-no_nce"] == [_cell(expected[("eercl-no_nce", "ck")]), "–", "–"]
  assert "raf2jaffe_eercl_seed3: unfinished: no results.json" in md
  assert "last step" in md

  with open(f"{out}.csv", encoding="utf-8") as f:
    table = {r["row"]: r for r in csv.DictReader(f)}
  tent = table["tent"]
  assert tent["method"] == "tent" and tent["variant"] == ""
  ck = [100 * v for v in expected[("tent", "ck")]]
  assert float(tent["ck_mean_pct"]) == pytest.approx(statistics.mean(ck), abs=1e-4)
  assert float(tent["ck_std_pct"]) == pytest.approx(statistics.stdev(ck), abs=1e-4)
  assert table["eercl"]["jaffe_n"] == "2" and table["eercl-no_nce"]["jaffe_n"] == "0"
  assert table["eercl-no_nce"]["variant"] == "no_nce" and table["eercl-no_nce"]["mean_pct"] == ""
  _check_latex((tmp_path / "table.tex").read_text(), columns=3, rows=4)


def _check_latex(tex, columns, rows):
  """A tabular that LaTeX parses: one begin/end, a column spec for the row label and each
  column, every row with as many cells (unescaped &) ending in \\\\, specials escaped."""
  body = "\n".join(l for l in tex.splitlines() if not l.lstrip().startswith("%"))
  assert body.count("\\begin{tabular}") == 1 and body.count("\\end{tabular}") == 1
  spec = re.search(r"\\begin\{tabular\}\{([^}]*)\}", body).group(1)
  assert len(spec.replace("|", "")) == columns + 1
  inner = body.split("\\begin{tabular}")[1].split("\\end{tabular}")[0]
  lines = [l.strip() for l in inner.splitlines()[1:] if l.strip() and l.strip() != "\\hline"]
  assert len(lines) == rows + 1    # header and rows
  for line in lines:
    assert line.endswith("\\\\"), line
    assert len(re.findall(r"(?<!\\)&", line)) == columns, line
    assert not re.search(r"(?<!\\)[_%#]", line), line
    assert "±" not in line and "–" not in line    # as LaTeX: $\pm$, --
    assert line.count("{") == line.count("}") and line.count("$") % 2 == 0, line
  assert "source\\_only" in inner and "$\\pm$" in inner


@pytest.mark.parametrize("rule", RULES)
def test_every_selection_rule(grid_runs, rule, capsys):
  dirs, expected, _ = grid_runs
  assert summarize.main([f"--select={rule}", *dirs]) == 0
  md = capsys.readouterr().out
  rows = _md_rows(md)
  picked = [v + RULE_OFFSET[rule] for v in expected[("tent", "ck")]]
  assert rows["tent"][0] == _cell(picked)
  assert ("uses target labels" in md) == (rule == "oracle")


def test_old_results_and_labels_from_the_record(tmp_path, capsys):
  """results.json without method/variant/selections (before they existed): the method from the
  folder name (none named: the configs' own, EERCL's), last and oracle from the lists' last and
  best; no IM/SND selection: '–'. A sweep record gives labels the folder name cannot (a
  source named with a 2, a target with an underscore)."""
  root = tmp_path / "runs"
  values = []
  for seed in (1, 2):
    doc, acc, _ = _adapt_results("eercl", "ck", seed, schema="old")
    _write(str(root / f"raf2ck_seed{seed}"), doc)
    values.append(acc)
    doc, _, _ = _adapt_results("tent", "ck", seed, schema="old")
    _write(str(root / f"raf2ck_tent_seed{seed}"), doc)
    doc, _, _ = _adapt_results("tent", "jaffe", seed)
    _write(str(root / f"fer20132ck_r50_tent_seed{seed}"), doc,
           {"stage": "adapt", "source": "fer2013", "target": "ck_r50", "method": "tent",
            "variant": None, "seed": seed, "argv": ["py"]})
  runs = sorted(glob.glob(str(root / "raf2ck*")))
  assert summarize.main(runs) == 0
  rows = _md_rows(capsys.readouterr().out)
  assert set(rows) == {"source_only", "tent", "eercl"}
  assert rows["eercl"][0] == _cell(values)
  assert summarize.main(["--select=oracle", *runs]) == 0
  rows = _md_rows(capsys.readouterr().out)
  assert rows["eercl"][0] == _cell([v + RULE_OFFSET["oracle"] for v in values])
  assert summarize.main(["--select=im", *runs]) == 0
  assert _md_rows(capsys.readouterr().out)["eercl"][0] == "–"

  assert summarize.main(sorted(glob.glob(str(root / "fer2013*")))) == 0
  md = capsys.readouterr().out
  header = next(l for l in md.splitlines() if l.startswith("| method"))
  assert "| ck_r50 |" in header
  # Two sources: the columns name the pair.
  assert summarize.main(sorted(glob.glob(str(root / "*_seed*")))) == 0
  header = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("| method"))
  assert [c.strip() for c in header.strip("|").split("|")] == [
      "method", "fer20132ck_r50", "raf2ck", "Mean"]


def test_latex_escapes_names():
  assert tables.latex_escape("a_b & 50% #1 {x} ~^\\") == (
      "a\\_b \\& 50\\% \\#1 \\{x\\} \\textasciitilde{}\\textasciicircum{}\\textbackslash{}")


# ------------------------------------------------------------------------ the per-group table

def _fake_results(stage, seed, target, source, source_only=None):
  pair = lambda a: {"accuracy": a[0], "mean_class_accuracy": a[1]}
  return {"stage": stage, "seed": seed, "config_file": None, "workdir": "x",
          "selection": "best target accuracy (oracle selection: uses target labels)",
          "best_step": 10, "last_step": 12,
          "lists": {"target": {"role": "target",
                               "source_only": pair(source_only) if source_only else None,
                               "best": pair(target[1]), "last": pair(target[0])},
                    "source": {"role": "source_test", "source_only": None,
                               "best": pair(source), "last": pair(source)}},
          "wall_time_s": 1.0, "devices": {"count": 1, "kind": "cpu"},
          "versions": {"jax": "x", "flax": "y", "eercl_jax": None}}


def test_groups_layout_three_seeds_and_a_missing_run(tmp_path, capsys):
  root = tmp_path / "runs"
  # (last acc, last mca), (best acc, best mca) for seeds 1..3
  for seed, last, best, so in [(1, (0.50, 0.40), (0.55, 0.42), (0.30, 0.20)),
                               (2, (0.60, 0.45), (0.65, 0.47), (0.30, 0.22)),
                               (3, (0.70, 0.50), (0.75, 0.52), (0.30, 0.24))]:
    _write(str(root / f"raf2expw_seed{seed}"),
           _fake_results("adapt", seed, (last, best), (0.9, 0.8), so))
  _write(str(root / "source_raf_seed1"), _fake_results("source", 1, ((0.2, 0.1), (0.2, 0.1)),
                                                       (0.9, 0.8)))
  _write(str(root / "raf2expw_seed4"))                          # unfinished: no results.json
  _write(str(root / "raf2ck_seed1"), "{truncated")
  runs = sorted(glob.glob(str(root / "*_seed*")))
  assert summarize.main(["--layout=groups", f"--out={root}/summary", *runs]) == 0
  md = capsys.readouterr().out
  assert md.strip() == open(root / "summary.md", encoding="utf-8").read().strip()
  assert "sample standard deviation (ddof=1)" in md
  row = next(l for l in md.splitlines() if l.startswith("| raf2expw | target |"))
  cells = [c.strip() for c in row.strip("|").split("|")]
  # group, list, role, n, seeds, so acc, so mca, acc, mca, best acc, best mca
  assert cells[:5] == ["raf2expw", "target", "target", "3", "1,2,3"]
  assert cells[5:] == ["30.00 ± 0.00", "22.00 ± 2.00", "60.00 ± 10.00", "45.00 ± 5.00",
                       "65.00 ± 10.00", "47.00 ± 5.00"]
  src = next(l for l in md.splitlines() if l.startswith("| raf2expw | source |"))
  assert "| source_test | 3 |" in src and "| – | – | 90.00 ± 0.00 |" in src
  assert md.index("| raf2expw | target |") < md.index("| raf2expw | source |")
  assert f"{root / 'raf2expw_seed4'}: unfinished: no results.json" in md
  assert f"{root / 'raf2ck_seed1'}: unreadable results.json" in md
  assert "oracle selection" in md
  one = next(l for l in md.splitlines() if l.startswith("| source_raf | target"))
  assert "± –" in one and "| 1 |" in one       # one run: no standard deviation
  assert not os.path.exists(root / "summary.tex")

  with open(root / "summary.csv", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  t = next(r for r in rows if r["group"] == "raf2expw" and r["list"] == "target")
  assert t["n"] == "3" and t["seeds"] == "1 2 3"
  assert float(t["adapted_acc_mean_pct"]) == pytest.approx(60.0)
  assert float(t["adapted_acc_std_pct"]) == pytest.approx(10.0)
  assert float(t["source_only_mca_std_pct"]) == pytest.approx(2.0)

  # The paper's layout of the same runs: the source run and the broken ones are not rows.
  assert summarize.main(runs) == 0
  md = capsys.readouterr().out
  assert list(_md_rows(md)) == ["source_only", "eercl"]
  assert "source_raf_seed1: a source run" in md

  assert summarize.main([str(root / "raf2expw_seed4")]) == 1
  assert "none of the 1 run(s)" in capsys.readouterr().err
  assert summarize.main([str(root / "source_raf_seed1")]) == 1
  assert "no adaptation run" in capsys.readouterr().err


def test_run_folders_from_a_file(grid_runs, tmp_path, capsys):
  """`@FILE` reads the run folders from a file, one a line (the sweep's summary job)."""
  dirs, _, _ = grid_runs
  listing = tmp_path / "runs.txt"
  listing.write_text("\n".join(dirs) + "\n")
  assert summarize.main([f"@{listing}"]) == 0
  assert list(_md_rows(capsys.readouterr().out)) == ["source_only", "tent", "eercl",
                                                     "eercl-no_nce"]


@pytest.mark.slow
def test_a_real_runs_results(source_run, capsys):
  """The tiny source run's own results.json, in the per-group table (a source run is not a row
  of the paper's layout)."""
  assert summarize.main(["--layout=groups", source_run]) == 0
  md = capsys.readouterr().out
  real = next(l for l in md.splitlines()
              if l.startswith(f"| {os.path.basename(source_run)} | target"))
  assert "± –" in real and "| 1 |" in real
