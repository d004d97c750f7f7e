"""Builds the original-layout FER lists from a downloaded data set (docs/datasets.md; the library:
eercl_jax/data/datasets/build.py).

    python -m eercl_jax.data.make_lists raf --src data/fer/raf
    python -m eercl_jax.data.make_lists expw            # --src defaults to <image_root>/<domain>
    python -m eercl_jax.data.make_lists folder --domain mine --src data/fer/mine \
        --split_dirs train=train test=test

Each data set's own label files are read in its native label order and mapped by name to
`config.data.class_names` (the project's alphabetical default, `--class_names` or `--config`).
Writes the source list, the target `_0` list, one list per split of the data set and
`counts_<domain>.md` under `--lists_dir` (data/txt/fer).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from eercl_jax import config_defaults
from eercl_jax.data import images
from eercl_jax.data.datasets import build
from eercl_jax.data.datasets.build import DATASETS, DEFAULT_IMAGE_ROOT, DEFAULT_LISTS_DIR, reader
from eercl_jax.errors import DataError
from eercl_jax.tools import cli


def _parser() -> argparse.ArgumentParser:
  common_args = argparse.ArgumentParser(add_help=False)
  g = common_args.add_argument_group("where and how")
  g.add_argument("--src", default=None,
                 help="the data set's folder (FER2013: the csv or its folder); default "
                      "<image_root>/<domain>. In-place images must lie under the image root")
  g.add_argument("--domain", default=None,
                 help="domain name in the list file names (default: the data set's: raf, "
                      "fer2013, expw, ck, jaffe, sfew, affectnet)")
  g.add_argument("--config", default=None,
                 help="a config file: class_names, image_root and the lists folder are read "
                      "from its config.data")
  g.add_argument("--class_names", default=None,
                 help="comma-separated class order of the labels (default: the config's, else "
                      f"{','.join(config_defaults.FER_CLASSES)})")
  g.add_argument("--image_root", default=None, help=f"list paths are relative to this folder "
                                                    f"(default {DEFAULT_IMAGE_ROOT})")
  g.add_argument("--lists_dir", default=None,
                 help=f"where the lists go (default {DEFAULT_LISTS_DIR})")
  g.add_argument("--source_splits", default=None,
                 help="comma-separated splits in the labeled_source list ('all' = every split)")
  g.add_argument("--target_splits", default=None,
                 help="comma-separated splits in the unlabeled_target _0 list ('all' = every "
                      "split)")
  g.add_argument("--keep_contempt", action="store_true",
                 help="keep contempt (CK+, AffectNet, folders); needs 'contempt' in class_names")
  g.add_argument("--skip_missing", action="store_true",
                 help="leave out (and count) labelled images whose file is missing instead of "
                      "stopping at the first")
  g.add_argument("--check_images", choices=images.CHECK_MODES, default="exists",
                 help="how the written lists are checked when read back (default: exists)")
  g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                 help="threads writing images (FER2013 rows, face crops)")

  parser = argparse.ArgumentParser(
      prog="python -m eercl_jax.data.make_lists",
      description="Build data/txt/fer/*_images_<domain>.txt from a downloaded FER data set.")
  sub = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")
  helps = {"raf": "RAF-DB basic (EmoLabel/list_patition_label.txt)",
           "fer2013": "FER2013 (fer2013.csv, rows written out as PNG)",
           "expw": "ExpW (label/label.lst, faces cropped)",
           "ck": "CK+ (Emotion/ labels, peak frames of cohn-kanade-images/)",
           "jaffe": "JAFFE (labels from the .tiff file names)",
           "sfew": "SFEW 2.0 (class folders under Train/ and Val/)",
           "affectnet": "AffectNet (training.csv / validation.csv)",
           "folder": "any class-per-folder tree (--domain required)"}
  for name in DATASETS:
    p = sub.add_parser(name, parents=[common_args], help=helps[name], description=helps[name])
    mod = reader(name)
    if hasattr(mod, "add_args"):   # a reader with options of its own
      mod.add_args(p.add_argument_group(f"{name} options"))
  return parser


def _load_config(path: str):
  if not os.path.isfile(path):
    raise DataError(f"--config {path}: file not found")
  try:
    return cli.load_config_file(path)
  except AttributeError as e:
    raise DataError(f"--config {path}: not a config file ({e})") from None


def _settings(args) -> tuple[tuple[str, ...], str, str]:
  """class_names, image_root and lists_dir from the flags, the config file and the defaults."""
  class_names, image_root, lists_dir = config_defaults.FER_CLASSES, DEFAULT_IMAGE_ROOT, \
      DEFAULT_LISTS_DIR
  if args.config:
    data = _load_config(args.config).data
    class_names = tuple(data.class_names)
    image_root = data.image_root
    lists_dir = os.path.dirname(data.train_list) or "."
  if args.class_names:
    class_names = tuple(n.strip() for n in args.class_names.split(",") if n.strip())
  return class_names, args.image_root or image_root, args.lists_dir or lists_dir


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  class_names, image_root, lists_dir = _settings(args)
  build.build_lists(args, class_names, image_root, lists_dir)
  return 0


def run() -> None:
  with cli.user_errors():
    sys.exit(main())


if __name__ == "__main__":
  run()
