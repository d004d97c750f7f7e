"""Packs an FER list into a tensorflow-datasets ArrayRecord set (the library: data/packed.py).

  python -m eercl_jax.data.pack --list=data/txt/fer/unlabeled_target_images_expw_0.txt \
      --image_root=data/fer --out=data/packed/unlabeled_target_images_expw_0 [--resize=256]

A run with `--config.data.format=packed` finds list X's set at <config.data.packed_root>/<stem
of X>. By default the pixels keep their original size (lossless); `--resize=R` stores each image
square-resized to R x R with the views' own resize (docs/data.md#packed-lists). The class names
come from --class_names, else the list's class-order file (<list>.classes.json), else the
configs' default; they are recorded in the set and checked by the runs.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from eercl_jax import config_defaults
from eercl_jax.data import lists, packed
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
                      help="comma-separated class names in label order (default: the list's "
                           "class-order file <list>.classes.json, else the configs' default); "
                           "must match the class-order file when the list has one")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
  parser.add_argument("--allow_outside_root", action="store_true",
                      help="allow list paths that are absolute or climb out of the image root")
  args = parser.parse_args(argv)
  recorded = lists.read_classes(args.list) if os.path.isfile(args.list) else None
  if args.class_names:
    class_names = tuple(n.strip() for n in args.class_names.split(",") if n.strip())
    names_from = "--class_names"
  elif recorded is not None:   # the list's own order: nothing to check, nothing to get wrong
    class_names, names_from = recorded["class_names"], "its class-order file"
  else:
    class_names, names_from = config_defaults.FER_CLASSES, "the default class names"
  out = packed.pack_list(args.list, args.image_root, args.out, class_names, args.resize,
                         allow_outside_root=args.allow_outside_root, overwrite=args.overwrite,
                         names_from=names_from)
  print(out, flush=True)
  return 0


def run() -> None:
  sys.exit(main())


if __name__ == "__main__":
  run()
