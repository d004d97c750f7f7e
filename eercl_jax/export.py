"""Taking a trained model out of a run: its backbone as a public-format `.npz` (the command:
`python -m eercl_jax.tools.export_npz`).

The model is rebuilt from the checkpoint's own metadata (`meta['model']`,
`meta['config']['data']['crop']`) unless a config is given. The layout is the backbone's registry
entry's `export_format`: the ViT with the public JAX ViT names (`Transformer/encoderblock_N/...`,
loadable by `weights.convert.init_backbone` and by tools that read the original ViT .npz files),
the ResNet with torchvision's state-dict names (OIHW convs, BN weight/bias/running_mean/
running_var).
"""
from __future__ import annotations

import jax
import ml_collections
from absl import logging

from eercl_jax import checkpoints
from eercl_jax.errors import CheckpointError
from eercl_jax.models import eercl
from eercl_jax.weights import convert


def backbone_npz(checkpoint: str, out_path: str, config=None, which: str = "best",
                 step: int | None = None) -> str:
  """Writes the backbone of `checkpoint` (a run's workdir - its best/ unless which='latest' -
  or a checkpoint folder) to `out_path`; returns the path."""
  directory = checkpoints.resolve_run_dir(checkpoint, which, what="checkpoint")
  _, meta = checkpoints.read_meta(directory)
  if config is not None:
    model_config, crop = config.model, config.data.crop
  else:
    model_config = ml_collections.ConfigDict(meta["model"])
    crop = meta.get("config", {}).get("data", {}).get("crop")
    if crop is None:
      raise CheckpointError(f"{directory}: metadata holds no data.crop; pass --config")
  model = eercl.create_model(model_config)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  variables, step = checkpoints.restore_variables(directory, model, crop, device, step)
  logging.info("restored %s step %d", directory, step)
  return convert.export_backbone_npz(variables, model_config, out_path)
