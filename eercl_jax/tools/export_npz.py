"""Exports the backbone of a run's checkpoint to an .npz file (the library: eercl_jax/export.py;
the whole model, head, classes and input included, is `python -m eercl_jax.tools.export`).

  python -m eercl_jax.tools.export_npz runs/source_raf OUT.npz [--which=best|latest] [--step=N]

CKPT is a run's workdir (its best/ checkpoint is used unless --which=latest or it has none) or a
checkpoint folder (best/ or checkpoints/); --config overrides the model the checkpoint records.
"""
from __future__ import annotations

from absl import app, flags

from eercl_jax.tools import cli


def main(argv):
  if len(argv) != 3:
    raise app.UsageError("usage: python -m eercl_jax.tools.export_npz CKPT OUT.npz "
                         "[--config=configs/X.py] [--which=best|latest] [--step=N]")
  from eercl_jax import export  # pylint: disable=import-outside-toplevel
  with cli.user_errors():
    path = export.backbone_npz(argv[1], argv[2], flags.FLAGS.config, flags.FLAGS.which,
                               flags.FLAGS.step)
  print(f"wrote {path}", flush=True)


def run() -> None:
  # Flags defined here, not at import, so tests and other entry points can import this module.
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file("config", None, "Optional config overriding the checkpoint's "
                                  "model description.", lock_config=True)
  flags.DEFINE_enum("which", "best", ["best", "latest"], "Checkpoint of a workdir to export.")
  flags.DEFINE_integer("step", None, "Step to export (default: the folder's latest).")
  # The optional --config is loaded as main.py's is (cli.parse_flags: its `from configs import`).
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  run()
