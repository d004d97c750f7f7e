"""Class and probabilities of images with a trained model (the library:
`eercl_jax.inference.load(path).predict(images)`, via `inference.predict_images`).

    python -m eercl_jax.predict --checkpoint=runs/raf2expw faces/ photo.jpg [--format=json|csv]

`--checkpoint` is a run's workdir (`--which`: by default best/ of a source run and the checkpoint
selected by SND (no target label) of an adaptation; best, latest, oracle, im, snd),
one of its checkpoint folders, one step's folder, or an exported model's folder
(`python -m eercl_jax.tools.export`, which needs neither the run nor its config). Folders are
searched recursively for image files (by extension, sorted); a file named on the command line
must be an image. Every image is decoded before the model loads, so an unreadable one is an
error naming it. Images go through the model's own test view (resize, crop, normalisation from
the checkpoint's stored config or the exported model's manifest) in batches sharded over all
devices, as in evaluation.

Output (stdout, or `--output=FILE`): a table (default), JSON
({"checkpoint", "step", "class_names", "predictions": [{"path", "class", "index",
"probabilities": {class: p}}]}) or CSV (path, class, then one probability column per class).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from typing import Sequence

from eercl_jax.tools import cli

WHICH = ("auto", "best", "latest", "oracle", "im", "snd")   # = checkpoints.WHICH (no jax here)

FORMATS = ("table", "json", "csv")


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
  return "\n".join([f"checkpoint {document['checkpoint']} step {document['step']} "
                    f"({document['selection']})",
                    line(header), *(line(b) for b in body)])


@cli.command
def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m eercl_jax.predict", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("inputs", nargs="+", metavar="IMAGES_OR_FOLDERS")
  parser.add_argument("--checkpoint", required=True, help="a run's workdir, checkpoint folder, "
                      "step folder or exported model")
  parser.add_argument("--which", choices=WHICH, default="auto",
                      help="checkpoint of a workdir: auto (default: best/ of a source run, the "
                           "label-free SND selection of an adaptation), best, latest, oracle "
                           "(best target accuracy: uses target labels), im, snd")
  parser.add_argument("--format", choices=FORMATS, default="table")
  parser.add_argument("--batch_size", type=int, default=0,
                      help="global batch (default: the run's eval_batch_size, 64 for an "
                      "exported model)")
  parser.add_argument("--num_workers", type=int, default=0, help="decoding worker processes")
  parser.add_argument("--output", default="", help="write here instead of stdout")
  args = parser.parse_args(argv)
  cli.grain_workers_ready()
  # pylint: disable=import-outside-toplevel
  import jax
  from eercl_jax import inference
  document = inference.predict_images(args.checkpoint, args.inputs, args.which,
                                      args.batch_size or None, args.num_workers)
  if jax.process_index() == 0:
    text = render(document, args.format)
    if args.output:
      with open(args.output, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    else:
      print(text, flush=True)
  return 0


def run() -> None:
  sys.exit(main())


if __name__ == "__main__":
  run()
