"""A 2-D map (t-SNE) of the features of the source-only and the adapted model, to a PNG (the
library: eercl_jax/feature_map.py, whose docstring says what is drawn).

  python -m eercl_jax.tools.feature_map runs/raf2expw feature_map.png [--source_run=RUN]
      [--which=auto|best|latest|oracle|im|snd] [--lists=target,source] [--max_per_list=500] [--perplexity=30]
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from eercl_jax.tools import cli


@cli.command
def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m eercl_jax.tools.feature_map",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("adapt_run", metavar="ADAPT_RUN",
                      help="an adaptation run's workdir or checkpoint folder")
  parser.add_argument("out", metavar="OUT.png")
  parser.add_argument("--source_run", default=None, help="the source-only model's run (default: "
                      "the adaptation's recorded source_checkpoint)")
  parser.add_argument("--which", choices=("auto", "best", "latest", "oracle", "im", "snd"),
                      default="auto", help="checkpoint of ADAPT_RUN to map (default auto: the "
                      "label-free SND selection)")
  parser.add_argument("--lists", default=None,
                      help="comma-separated evaluation lists of the run to map (default: all)")
  parser.add_argument("--max_per_list", type=int, default=500,
                      help="at most this many images of each list (a fixed random subset; 0 = all)")
  parser.add_argument("--perplexity", type=float, default=30.0,
                      help="t-SNE perplexity (capped at (N-1)/3)")
  parser.add_argument("--seed", type=int, default=0, help="seed of the subsets and of t-SNE")
  parser.add_argument("--batch_size", type=int, default=128,
                      help="images per forward pass (rounded up to a multiple of the devices)")
  args = parser.parse_args(argv)
  from eercl_jax import feature_map  # pylint: disable=import-outside-toplevel
  out = feature_map.feature_map(
      args.adapt_run, args.out, source_run=args.source_run, which=args.which,
      list_names=args.lists.split(",") if args.lists else None,
      max_per_list=args.max_per_list, perplexity=args.perplexity, seed=args.seed,
      batch_size=args.batch_size)
  counts = ", ".join(f"{k}: {v}" for k, v in out["counts"].items())
  print(f"wrote {out['path']} ({counts} images)", flush=True)
  return 0


def run() -> None:
  sys.exit(main())


if __name__ == "__main__":
  run()
