"""Exports a trained model whole - backbone, head, class names, input size and normalisation - to
one folder that loads without the run or its config (the library: eercl_jax/export.py; the
format: docs/export.md).

  python -m eercl_jax.tools.export runs/source_raf exported/raf [--which=auto|best|latest|oracle|im|snd]
      [--format=saved_model|jax]

RUN_OR_CHECKPOINT is a run's workdir (--which: auto by default, see eercl_jax.predict),
one of its checkpoint folders, one step's folder, or an exported model. OUT is a new folder:
manifest.json, variables.safetensors and, with --format=saved_model (the default), saved_model/,
a TensorFlow SavedModel of the same forward (uint8 crops in; logits, probabilities and features
out). Load it with `eercl_jax.inference.load(OUT).predict(images)` or
`python -m eercl_jax.predict --checkpoint=OUT IMAGES`.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from eercl_jax.tools import cli

FORMATS = ("saved_model", "jax")


@cli.command
def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m eercl_jax.tools.export", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT")
  parser.add_argument("out", metavar="OUT", help="the new folder to write")
  parser.add_argument("--which", choices=("auto", "best", "latest", "oracle", "im", "snd"),
                      default="auto", help="checkpoint of a workdir (default auto: best/ of a "
                      "source run, the SND selection of an adaptation)")
  parser.add_argument("--format", choices=FORMATS, default="saved_model",
                      help="saved_model: the exported model and a TF SavedModel (default); "
                      "jax: the exported model only")
  args = parser.parse_args(argv)
  from eercl_jax import export  # pylint: disable=import-outside-toplevel
  out = export.export_model(args.checkpoint, args.out, args.which, args.format)
  print(f"wrote {out}", flush=True)
  return 0


def run() -> None:
  sys.exit(main())


if __name__ == "__main__":
  run()
