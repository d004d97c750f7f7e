"""SFEW 2.0: class folders (Angry, Disgust, Fear, Happy, Neutral, Sad, Surprise) under `Train/`
and `Val/` (the test labels were never released). Use `--split_dirs` for archives that nest the
aligned faces deeper, e.g. `train=Train/Train_Aligned_Faces val=Val/Val_Aligned_Faces`
(docs/datasets.md#sfew-20)."""
from __future__ import annotations

from eercl_jax.data.datasets import common, folder

DOMAIN = "sfew"
SPLITS = ("train", "val")
SOURCE_SPLITS = ("train",)
TARGET_SPLITS = ("val",)


def add_args(parser):
  parser.add_argument("--split_dirs", nargs="*", default=["train=Train", "val=Val"],
                      metavar="SPLIT=DIR",
                      help="class-folder tree of each split, relative to --src "
                           "(default: train=Train val=Val)")


def splits(args) -> tuple[str, ...]:
  return tuple(s for s, _ in folder.parse_split_dirs(args.split_dirs))


def read(src: str, args, ctx: common.Context) -> list[common.Item]:
  return folder.read(src, args, ctx)
