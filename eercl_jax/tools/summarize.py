"""Results tables over seeds, from the runs' results.json files (the library: eercl_jax/tables.py,
whose docstring describes both layouts and how a run's method, target and seed are found).

    python -m eercl_jax.summarize runs/paper/*_seed* [--select=oracle|im|snd|last] [--out=PREFIX]
    python -m eercl_jax.summarize --layout=groups runs/raf2expw_seed* runs/raf2ck_seed*
    python -m eercl_jax.summarize @runs/paper/sweep/runs.txt     # run folders from a file

The paper's layout (default): methods and variants by targets, mean ± std over seeds, a Mean
column; `--out=PREFIX` writes PREFIX.md, PREFIX.csv and PREFIX.tex (a tabular). The per-group
table (`--layout=groups`): every list's source-only, last-step and best-step accuracy and mean
class accuracy per group of seeds; `--out=PREFIX` writes PREFIX.md and PREFIX.csv. Markdown goes
to stdout. Exit status: 0 when at least one run was summarised, 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from eercl_jax import constants, tables


def _write(path: str, text: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.write(text if text.endswith("\n") else text + "\n")


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m eercl_jax.summarize", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   fromfile_prefix_chars="@")
  parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIRS",
                      help="run folders; @FILE reads them from FILE, one a line")
  parser.add_argument("--out", default="", help="also write OUT.md and OUT.csv (and, for the "
                      "paper's layout, OUT.tex)")
  parser.add_argument("--layout", choices=("paper", "groups"), default="paper",
                      help="paper: methods by targets; groups: one row per group and list")
  parser.add_argument("--select", choices=tables.RULES, default="last",
                      help="paper layout: the checkpoint of each run (oracle uses target "
                      "labels; im, snd are label-free scores; last: the last step)")
  parser.add_argument("--metric", choices=tuple(tables.METRIC_TEXT), default="accuracy",
                      help="paper layout: the number in the cells")
  args = parser.parse_args(argv)
  found, missing = tables.load_runs(args.run_dirs)
  files = {}
  if args.layout == "groups":
    rows = tables.aggregate(found)
    text = tables.markdown(rows, missing)
    files = {"md": text, "csv": tables.csv_text(rows)}
    summarised = bool(found)
  else:
    entries, left = tables.paper_entries(found, args.select, args.metric)
    table = tables.paper_table(entries, args.select, args.metric)
    text = tables.paper_markdown(table, missing, left)
    files = {"md": text, "csv": tables.paper_csv(table), "tex": tables.paper_latex(table)}
    summarised = bool(entries)
  print(text, flush=True)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for ext, content in files.items():
      _write(f"{args.out}.{ext}", content)
  if not found:
    print(f"error: none of the {len(args.run_dirs)} run(s) has a readable {constants.RESULTS_FILE}",
          file=sys.stderr, flush=True)
    return 1
  if not summarised:
    print(f"error: no adaptation run among the {len(found)} finished run(s): the paper's layout "
          f"has no rows (--layout=groups shows source runs)", file=sys.stderr, flush=True)
    return 1
  return 0


def run() -> None:
  sys.exit(main())


if __name__ == "__main__":
  run()
