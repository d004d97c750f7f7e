"""A class-per-folder tree: `<src>/<class>/**/<image>`, or with `--split_dirs train=Train
test=Test` one such tree per split (`<src>/Train/<class>/...`). Folder names are matched to
class_names case-insensitively, with the common aliases of `common.ALIASES`
(docs/datasets.md#a-class-per-folder-tree)."""
from __future__ import annotations

import os

from eercl_jax.data import images
from eercl_jax.data.datasets import common
from eercl_jax.errors import DataError

DOMAIN = None          # no default: name it with --domain
SPLITS = ("all",)
SOURCE_SPLITS = TARGET_SPLITS = ("all",)


def add_args(parser):
  parser.add_argument(
      "--split_dirs", nargs="*", default=None, metavar="SPLIT=DIR",
      help="one class-per-folder tree per split, DIR relative to --src (e.g. train=Train "
           "test=Test); default: --src itself is one tree, split 'all'")


def parse_split_dirs(pairs) -> list[tuple[str, str]]:
  out = []
  for pair in pairs:
    split, sep, rel = pair.partition("=")
    if not sep or not split or not rel:
      raise DataError(f"--split_dirs: expected SPLIT=DIR, got {pair!r}")
    out.append((split.lower(), rel))
  return out


def splits(args) -> tuple[str, ...]:
  if getattr(args, "split_dirs", None):
    return tuple(s for s, _ in parse_split_dirs(args.split_dirs))
  return SPLITS


def read_tree(tree: str, split: str, ctx: common.Context) -> list[common.Item]:
  """The images of one class-per-folder tree, each labelled by its top folder."""
  if not os.path.isdir(tree):
    raise DataError(f"{tree}: folder not found")
  items = []
  for entry in sorted(os.listdir(tree)):
    path = os.path.join(tree, entry)
    if common.is_junk(entry):
      continue
    if not os.path.isdir(path):
      if images.is_image_name(entry):
        raise DataError(f"{path}: image outside any class folder (its class is unknown)")
      continue
    files = []
    for root, dirs, names in os.walk(path):
      dirs[:] = sorted(d for d in dirs if not common.is_junk(d))
      files += [os.path.join(root, n) for n in sorted(names) if images.is_image_name(n)]
    cls = ctx.resolve(entry, path, what="unknown class folder", count=len(files))
    if cls is None:
      continue
    items += [common.Item(split, f, cls, where=f) for f in files]
  return items


def read(src: str, args, ctx: common.Context) -> list[common.Item]:
  if not getattr(args, "split_dirs", None):
    return read_tree(src, "all", ctx)
  items = []
  for split, rel in parse_split_dirs(args.split_dirs):
    tree = common.find(src, rel)
    if tree is None:
      raise DataError(f"{os.path.join(src, rel)}: folder of split {split!r} not found")
    items += read_tree(tree, split, ctx)
  return items
