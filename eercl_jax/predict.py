"""Class and probabilities of images with a trained checkpoint.

    python -m eercl_jax.predict --checkpoint=runs/raf2expw faces/ photo.jpg [--format=json|csv]

`--checkpoint` is a run's workdir (its best/ checkpoint, or with `--which=latest` its latest),
one of its checkpoint folders, or one step's folder. Folders are searched recursively for image
files (by extension, sorted); a file named on the command line must be an image. Every image is
decoded before the model runs, so an unreadable one is an error naming it. Images go through the
run's own test view (resize, crop, normalisation from the config stored in the checkpoint) in
batches sharded over all devices, as in evaluation.

Output (stdout, or `--output=FILE`): a table (default), JSON
({"checkpoint", "step", "class_names", "predictions": [{"path", "class", "index",
"probabilities": {class: p}}]}) or CSV (path, class, then one probability column per class).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from typing import Sequence

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm")
FORMATS = ("table", "json", "csv")


class InputError(ValueError):
  """A named input is missing, not an image, or unreadable."""


def collect_images(inputs: Sequence[str]) -> list[str]:
  """Image files of `inputs` (files and folders, folders recursively), in the given order,
  each folder's images sorted; duplicates kept once."""
  if not inputs:
    raise InputError("no images or folders given")
  out, seen = [], set()
  for item in inputs:
    if os.path.isdir(item):
      found = []
      for root, dirs, files in os.walk(item):
        dirs.sort()
        found += [os.path.join(root, f) for f in sorted(files)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
      if not found:
        raise InputError(f"{item}: folder holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    elif os.path.isfile(item):
      if not item.lower().endswith(IMAGE_EXTENSIONS):
        raise InputError(f"{item}: not an image file (expected one of "
                         f"{', '.join(IMAGE_EXTENSIONS)})")
      found = [item]
    else:
      raise InputError(f"{item}: no such file or folder")
    for path in found:
      key = os.path.abspath(path)
      if key not in seen:
        seen.add(key)
        out.append(path)
  return out


def check_decodable(paths: Sequence[str]) -> None:
  """Decodes every image with the training loader (on threads); an error names each bad one."""
  from eercl_jax.data import lists  # pylint: disable=import-outside-toplevel
  problems = lists._check_images([os.path.abspath(p) for p in paths], "decode")  # pylint: disable=protected-access
  bad = [f"{p}: {why}" for p, why in zip(paths, problems) if why is not None]
  if bad:
    raise InputError(f"{len(bad)} unreadable image(s):\n  " + "\n  ".join(bad[:20]))


def predict(checkpoint: str, inputs: Sequence[str], which: str = "best",
            batch_size: int = 0, num_workers: int = 0) -> dict:
  """The JSON document of the module docstring."""
  # pylint: disable=import-outside-toplevel
  from eercl_jax import inference
  from eercl_jax.data import lists
  paths = collect_images(inputs)
  check_decodable(paths)
  loaded = inference.load(checkpoint, which, what="--checkpoint")
  devices = loaded.mesh.devices.size
  if batch_size <= 0:   # the run's own, rounded up to fill every device
    batch_size = -(-int(loaded.config.get("eval_batch_size", 128)) // devices) * devices
  fer_list = lists.FerList(
      list_path="<predict inputs>", image_root=os.path.abspath(os.sep),
      paths=tuple(os.path.abspath(p) for p in paths), labels=np.zeros(len(paths), np.int32),
      class_names=loaded.class_names, lines=np.arange(1, len(paths) + 1, dtype=np.int32),
      num_skipped=0)
  probs = inference.probabilities(loaded, fer_list, batch_size, num_workers)
  names = list(loaded.class_names)
  predictions = []
  for path, p in zip(paths, probs):
    k = int(np.argmax(p))
    predictions.append({"path": path, "class": names[k], "index": k,
                        "probabilities": {c: float(v) for c, v in zip(names, p)}})
  return {"checkpoint": os.path.abspath(loaded.directory), "step": loaded.step,
          "class_names": names, "predictions": predictions}


def render(document: dict, fmt: str) -> str:
  names = document["class_names"]
  rows = document["predictions"]
  if fmt == "json":
    return json.dumps(document, indent=2)
  if fmt == "csv":
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "class", *names])
    for r in rows:
      writer.writerow([r["path"], r["class"],
                       *(f"{r['probabilities'][c]:.6f}" for c in names)])
    return buf.getvalue().rstrip("\n")
  if fmt != "table":
    raise ValueError(f"--format={fmt!r}: expected one of {FORMATS}")
  header = ["path", "class", "p", *names]
  body = [[r["path"], r["class"], f"{r['probabilities'][r['class']]:.3f}",
           *(f"{r['probabilities'][c]:.3f}" for c in names)] for r in rows]
  widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
  line = lambda cells: "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths)))
  return "\n".join([f"checkpoint {document['checkpoint']} step {document['step']}",
                    line(header), *(line(b) for b in body)])


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m eercl_jax.predict", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("inputs", nargs="+", metavar="IMAGES_OR_FOLDERS")
  parser.add_argument("--checkpoint", required=True, help="a run's workdir, checkpoint folder "
                      "or step folder")
  parser.add_argument("--which", choices=("best", "latest"), default="best",
                      help="checkpoint of a workdir (default best)")
  parser.add_argument("--format", choices=FORMATS, default="table")
  parser.add_argument("--batch_size", type=int, default=0,
                      help="global batch (default: the run's eval_batch_size)")
  parser.add_argument("--num_workers", type=int, default=0, help="decoding worker processes")
  parser.add_argument("--output", default="", help="write here instead of stdout")
  args = parser.parse_args(argv)
  try:
    document = predict(args.checkpoint, args.inputs, args.which, args.batch_size,
                       args.num_workers)
  except (InputError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_index() == 0:
    text = render(document, args.format)
    if args.output:
      with open(args.output, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    else:
      print(text, flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
