"""Writes the built-in synthetic FER data set (the library: eercl_jax/data/datasets/synthetic.py).

    python -m eercl_jax.data.synthetic --root data [--image_size 64] [--overwrite]
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from eercl_jax.data.datasets import synthetic
from eercl_jax.tools import cli


@cli.command
def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m eercl_jax.data.synthetic",
                                   description=synthetic.__doc__.splitlines()[0])
  parser.add_argument("--root", default="data")
  for name, default in synthetic.DEFAULTS.items():
    parser.add_argument(f"--{name}", type=int, default=default)
  parser.add_argument("--overwrite", action="store_true")
  args = parser.parse_args(argv)
  paths = synthetic.generate(args.root, overwrite=args.overwrite,
                             **{k: getattr(args, k) for k in synthetic.DEFAULTS})
  for name, path in paths.items():
    print(f"{name}: {path}")
  return 0


def run() -> None:
  sys.exit(main())


if __name__ == "__main__":
  run()
