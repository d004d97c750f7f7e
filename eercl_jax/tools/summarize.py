"""A results table over seeds, from the runs' results.json files (the library: eercl_jax/tables.py).

    python -m eercl_jax.summarize runs/raf2expw_seed* runs/raf2ck_seed* [--out=runs/summary]

Markdown goes to stdout; `--out=PREFIX` also writes PREFIX.md and PREFIX.csv. Exit status: 0
when at least one run was summarised, 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from eercl_jax import constants, tables


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m eercl_jax.summarize", description=tables.__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIRS")
  parser.add_argument("--out", default="", help="also write OUT.md and OUT.csv")
  args = parser.parse_args(argv)
  found, missing = tables.load_runs(args.run_dirs)
  rows = tables.aggregate(found)
  text = tables.markdown(rows, missing)
  print(text, flush=True)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(f"{args.out}.md", "w", encoding="utf-8") as f:
      f.write(text + "\n")
    with open(f"{args.out}.csv", "w", encoding="utf-8") as f:
      f.write(tables.csv_text(rows))
  if not found:
    print(f"error: none of the {len(args.run_dirs)} run(s) has a readable {constants.RESULTS_FILE}",
          file=sys.stderr, flush=True)
    return 1
  return 0


def run() -> None:
  sys.exit(main())


if __name__ == "__main__":
  run()
