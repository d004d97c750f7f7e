"""Packs an FER list into a tensorflow-datasets ArrayRecord set (the library: data/packed.py).

  python -m eercl_jax.data.pack --list=data/txt/fer/unlabeled_target_images_expw_0.txt \
      --image_root=data/fer --out=data/packed/unlabeled_target_images_expw_0 [--resize=256]

A run with `--config.data.format=packed` finds list X's set at <config.data.packed_root>/<stem
of X>. By default the pixels keep their original size (lossless); `--resize=R` stores each image
square-resized to R x R with the views' own resize (docs/data.md#packed-lists).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from eercl_jax import config_defaults
from eercl_jax.data import packed
from eercl_jax.tools import cli


@cli.command
def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m eercl_jax.data.pack", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--list", required=True, help="FER list file (`relative/path label` lines)")
  parser.add_argument("--image_root", required=True,
                      help="folder the list's paths are relative to")
  parser.add_argument("--out", required=True, help="output folder of the packed set")
  parser.add_argument("--resize", type=int, default=None,
                      help="store each image square-resized to this size (config.data.resize); "
                           "default: original size, lossless")
  parser.add_argument("--class_names", default=None,
                      help="comma-separated class names in label order (default: the configs')")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
  parser.add_argument("--allow_outside_root", action="store_true",
                      help="allow list paths that are absolute or climb out of the image root")
  args = parser.parse_args(argv)
  class_names = (tuple(args.class_names.split(",")) if args.class_names
                 else config_defaults.FER_CLASSES)
  out = packed.pack_list(args.list, args.image_root, args.out, class_names, args.resize,
                         allow_outside_root=args.allow_outside_root, overwrite=args.overwrite)
  print(out, flush=True)
  return 0


def run() -> None:
  sys.exit(main())


if __name__ == "__main__":
  run()
