"""Exports the backbone of a run's checkpoint to an .npz file.

  python -m eercl_jax.tools.export_npz runs/source_raf OUT.npz [--which=best|latest] [--step=N]

CKPT is a run's workdir (its best/ checkpoint is used unless --which=latest or it has none) or a
checkpoint folder (best/ or checkpoints/). The model is rebuilt from the checkpoint's own metadata
(`meta['model']`, `meta['config']['data']['crop']`); --config overrides both. The layout is the
backbone's registry entry's `export_format`: the ViT with the public JAX ViT names
(`Transformer/encoderblock_N/...`, loadable by `weights.convert.init_backbone` and by tools that
read the original ViT .npz files), the ResNet with torchvision's state-dict names (OIHW convs, BN
weight/bias/running_mean/running_var).
"""
from __future__ import annotations

import jax
import ml_collections
from absl import app, flags, logging

from eercl_jax import checkpoints
from eercl_jax.models import eercl
from eercl_jax.weights import convert


def export(checkpoint: str, out_path: str, config=None, which: str = "best",
           step: int | None = None) -> str:
  directory = checkpoints.resolve_run_dir(checkpoint, which, what="checkpoint")
  _, meta = checkpoints.read_meta(directory)
  if config is not None:
    model_config, crop = config.model, config.data.crop
  else:
    model_config = ml_collections.ConfigDict(meta["model"])
    crop = meta.get("config", {}).get("data", {}).get("crop")
    if crop is None:
      raise ValueError(f"{directory}: metadata holds no data.crop; pass --config")
  model = eercl.create_model(model_config)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  variables, step = checkpoints.restore_variables(directory, model, crop, device, step)
  logging.info("restored %s step %d", directory, step)
  return convert.export_backbone_npz(variables, model_config, out_path)


def main(argv):
  if len(argv) != 3:
    raise app.UsageError("usage: python -m eercl_jax.tools.export_npz CKPT OUT.npz "
                         "[--config=configs/X.py] [--which=best|latest] [--step=N]")
  path = export(argv[1], argv[2], flags.FLAGS.config, flags.FLAGS.which, flags.FLAGS.step)
  print(f"wrote {path}", flush=True)


def _define_flags():
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file("config", None, "Optional config overriding the checkpoint's "
                                  "model description.", lock_config=True)
  flags.DEFINE_enum("which", "best", ["best", "latest"], "Checkpoint of a workdir to export.")
  flags.DEFINE_integer("step", None, "Step to export (default: the folder's latest).")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
