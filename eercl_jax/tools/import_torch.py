"""Converts a source model trained by the original PyTorch EERCL/CRCo code into an orbax checkpoint.

  python -m eercl_jax.tools.import_torch best_model.pth runs/source_raf_r50_torch \
      --config=configs/source_raf_r50.py

The input is the original's `best_model.pth` (or any of its checkpoints): a dict whose
'base_model' entry is the state dict of `sfda_simplified_contrastive_model` wrapped in
DistributedDataParallel, i.e. keys `module.online_network.*`, `module.online_classifier.*`,
`module.target_network.*`, `module.target_classifier.*` (the 'module.' prefix is optional here).
The online (student) weights are used; the original's teacher is a copy of them when its stage 2
starts, so `target_*` is ignored. The output folder gets OUT_DIR/best/<step> (and
an empty OUT_DIR/checkpoints/), so stage 2 reads it with `--config.source_checkpoint=OUT_DIR`.

Original state-dict names (CRCo/models/sfda_models.py, CRCo/models/ViTSFDA.py; the ViT body is
SSRT's `VT`, timm-compatible names):
  ResNet-50 (`SFDAResNetBase`): online_network.{conv1,bn1,layer1..4}.* (also aliased as
    online_network.feature_layers.{0,1,4,5,6,7}.*), online_network.bottleneck (Linear 2048->256),
    online_network.bn (BatchNorm1d 256).
  ViT (`vit_sfda_basenet`): online_network.base_network.* (patch_embed.proj, cls_token,
    pos_embed, blocks.N.*, norm, head), online_network.bottleneck.{0: Linear, 1: BatchNorm1d},
    online_network.classifier.0 (Linear), online_network.sfda_bottleneck, online_network.sfda_bn.
  Classifier (`SFDAClassifier` / `vit_sfda_classifier`): online_classifier.fc.{weight_g (C,1),
    weight_v (C,D), bias} (torch.nn.utils.weight_norm, dim=0).
The mapping and the import itself are `eercl_jax.weights.original` (from each backbone's
registry entry).
"""
from __future__ import annotations

from absl import app, flags

from eercl_jax.tools import cli


def main(argv):
  if len(argv) != 3:
    raise app.UsageError("usage: python -m eercl_jax.tools.import_torch SRC.pth OUT_DIR "
                         "--config=configs/X.py")
  from eercl_jax.weights import original  # pylint: disable=import-outside-toplevel
  with cli.user_errors():
    report = original.import_checkpoint(argv[1], argv[2], flags.FLAGS.config, flags.FLAGS.step)
  print(f"imported {argv[1]} -> {report['out_dir']}/{report['step']} "
        f"({len(report['loaded'])} arrays; ignored {len(report['ignored'])} file arrays)",
        flush=True)


def run() -> None:
  # Flags defined here, not at import, so tests and other entry points can import this module.
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config = config_flags.DEFINE_config_file(
      "config", None, "Config whose `model` (and data.crop, class names) describe the network.",
      lock_config=True)
  flags.DEFINE_integer("step", None, "Step to record (default: the original scheduler's "
                       "last_epoch, else 0).")
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, config))


if __name__ == "__main__":
  run()
