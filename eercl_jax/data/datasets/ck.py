"""CK+: frames `cohn-kanade-images/Sxxx/nnn/Sxxx_nnn_0000000k.png`, and for the 327 labelled
sequences one `Emotion/Sxxx/nnn/*_emotion.txt` holding a float (e.g. `3.0000000e+00`): 0=neutral,
1=anger, 2=contempt, 3=disgust, 4=fear, 5=happy, 6=sadness, 7=surprise. Sequences run from a
neutral face to the peak of the expression, so the last `--ck_peak_frames` frames (default 3)
take the sequence's label and, by default, the first frame is a neutral example
(docs/datasets.md#ck)."""
from __future__ import annotations

import os

from eercl_jax.data import images
from eercl_jax.data.datasets import common
from eercl_jax.errors import DataError

DOMAIN = "ck"
SPLITS = ("all",)
SOURCE_SPLITS = TARGET_SPLITS = ("all",)
LABELS = {0: "neutral", 1: "angry", 2: "contempt", 3: "disgust", 4: "fear", 5: "happy", 6: "sad",
          7: "surprise"}


def add_args(parser):
  parser.add_argument("--ck_peak_frames", type=int, default=3,
                      help="last frames of each labelled sequence taken with its label (3)")
  parser.add_argument("--ck_neutral", choices=("first", "none"), default="first",
                      help="'first': each labelled sequence's first frame is a neutral example "
                           "(default); 'none': no neutral images")


def _emotion(path: str, ctx: common.Context):
  lines = common.read_lines(path)
  if len(lines) != 1:
    raise DataError(f"{path}: expected one label, found {len(lines)} non-blank lines")
  line_no, text = lines[0]
  where = f"{path}:{line_no}"
  try:
    value = float(text)
  except ValueError:
    raise DataError(f"{where}: label {text.strip()!r} is not a number") from None
  if value != int(value):
    raise DataError(f"{where}: label {text.strip()!r} is not a whole number")
  return ctx.native(LABELS, int(value), where)


def read(src: str, args, ctx: common.Context) -> list[common.Item]:
  if args.ck_peak_frames < 1:
    raise DataError(f"--ck_peak_frames must be >= 1, got {args.ck_peak_frames}")
  image_dir = common.require(src, "cohn-kanade-images", what="CK+ image folder")
  emotion_dir = common.require(src, "Emotion", what="CK+ emotion folder")
  items, labelled = [], set()
  for root, dirs, names in os.walk(emotion_dir):
    dirs.sort()
    labels = sorted(n for n in names if n.endswith("_emotion.txt") and not common.is_junk(n))
    if not labels:
      continue
    if len(labels) > 1:
      raise DataError(f"{root}: {len(labels)} emotion files for one sequence: {labels}")
    label_path = os.path.join(root, labels[0])
    labelled.add(os.path.relpath(root, emotion_dir))
    cls = _emotion(label_path, ctx)
    if cls is None:
      continue
    sequence = os.path.join(image_dir, os.path.relpath(root, emotion_dir))
    frames = sorted(n for n in os.listdir(sequence) if images.is_image_name(n)) \
        if os.path.isdir(sequence) else []
    if not frames:
      raise DataError(f"{label_path}: its sequence {sequence} has no frames")
    neutral = args.ck_neutral == "first" and len(frames) > 1 and cls != "neutral"
    peak = frames[max(1 if neutral else 0, len(frames) - args.ck_peak_frames):]
    if neutral:
      first = ctx.resolve("neutral", label_path)
      items.append(common.Item("all", os.path.join(sequence, frames[0]), first, label_path))
    items += [common.Item("all", os.path.join(sequence, f), cls, label_path) for f in peak]
  sequences = {os.path.relpath(root, image_dir) for root, _, names in os.walk(image_dir)
               if any(images.is_image_name(n) for n in names)}
  if sequences - labelled:
    ctx.skipped["sequence without an emotion label"] += len(sequences - labelled)
  return items
