"""Converts a source model trained by the original PyTorch EERCL/CRCo code into an orbax checkpoint.

  python -m eercl_jax.tools.import_torch best_model.pth runs/source_raf_r50_torch \
      --config=configs/source_raf_r50.py

The input is the original's `best_model.pth` (or any of its checkpoints): a dict whose
'base_model' entry is the state dict of `sfda_simplified_contrastive_model` wrapped in
DistributedDataParallel, i.e. keys `module.online_network.*`, `module.online_classifier.*`,
`module.target_network.*`, `module.target_classifier.*` (the 'module.' prefix is optional here).
The online (student) weights are used; the teacher copy equals them after loading in the original
too (algorithm.md 2.1), so `target_*` is ignored. The output folder gets OUT_DIR/best/<step> (and
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
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import traverse_util

from eercl_jax.models import pretrained

_BACKBONE_PREFIX = {"resnet50": "online_network.", "vit": "online_network.base_network."}
_BACKBONE_RULE = {"resnet50": pretrained.torchvision_resnet_rule,
                  "vit": pretrained.timm_vit_rule}
_DENSE = {
    "resnet50": {"sfda_bottleneck": "online_network.bottleneck"},
    "vit": {"bottleneck": "online_network.bottleneck.0", "mlp": "online_network.classifier.0",
            "sfda_bottleneck": "online_network.sfda_bottleneck"},
}
_BN = {
    "resnet50": {"sfda_bn": "online_network.bn"},
    "vit": {"bottleneck_bn": "online_network.bottleneck.1", "sfda_bn": "online_network.sfda_bn"},
}
_CLASSIFIER = {"g": "online_classifier.fc.weight_g", "v": "online_classifier.fc.weight_v",
               "b": "online_classifier.fc.bias"}
# torch.nn.utils.parametrizations.weight_norm (newer PyTorch) names the same two tensors so.
_PARAMETRIZED = {
    "online_classifier.fc.weight_g": "online_classifier.fc.parametrizations.weight.original0",
    "online_classifier.fc.weight_v": "online_classifier.fc.parametrizations.weight.original1"}
# SFDAResNetBase registers its layers twice: as attributes and inside `feature_layers`.
_FEATURE_LAYERS = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3",
                   "7": "layer4"}
_IGNORED_PREFIXES = ("target_network.", "target_classifier.", "online_network.feature_layers.",
                     "online_network.base_network.head.", "online_network.base_network.head_dist.",
                     "online_network.base_network.pre_logits.")


def eercl_rule(backbone: str) -> pretrained.Rule:
  """Model path (('params'|'batch_stats', scope, ...)) -> original key and transforms."""
  bb_rule, bb_prefix = _BACKBONE_RULE[backbone], _BACKBONE_PREFIX[backbone]
  dense, bn = _DENSE[backbone], _BN[backbone]

  def rule(path, shape):
    col, scope, *rest = path
    leaf = rest[-1]
    if scope == "backbone":
      key, fwd, inv = bb_rule((col, *rest), shape)
      return bb_prefix + key, fwd, inv
    if scope == "classifier" and col == "params" and leaf in _CLASSIFIER:
      if leaf == "g":   # (C, 1) -> (C,)
        return _CLASSIFIER[leaf], lambda a, s: a.reshape(s), lambda a: a.reshape(-1, 1)
      return _CLASSIFIER[leaf], pretrained.identity, pretrained.identity
    if scope in dense and col == "params":
      if leaf == "kernel":
        return (f"{dense[scope]}.weight", lambda a, s: a.T, lambda a: a.T)
      return f"{dense[scope]}.bias", pretrained.identity, pretrained.identity
    if scope in bn:
      return pretrained.torch_bn_rule(col, bn[scope], leaf)
    raise KeyError(path)
  return rule


def _ignorable(key: str) -> bool:
  return key.startswith(_IGNORED_PREFIXES) or key.endswith("num_batches_tracked")


def base_model_state_dict(raw, where: str) -> tuple[dict[str, np.ndarray], int | None]:
  """(online/teacher state dict without the DDP 'module.' prefix, the scheduler's iteration)."""
  if not isinstance(raw, dict):
    raise ValueError(f"{where}: holds a {type(raw).__name__}, expected the original's checkpoint "
                     "dict")
  step = None
  if "base_model" in raw:
    sd = raw["base_model"]
    sched = raw.get("base_model_scheduler")
    if isinstance(sched, dict) and isinstance(sched.get("last_epoch"), int):
      step = int(sched["last_epoch"])
  elif any("online_network." in str(k) for k in raw):
    sd = raw
  else:
    raise ValueError(f"{where}: no 'base_model' entry and no online_network.* keys (entries: "
                     f"{sorted(map(str, raw))[:10]})")
  sd = {str(k): v for k, v in sd.items() if isinstance(v, np.ndarray)}
  if sd and all(k.startswith("module.") for k in sd):
    sd = {k[len("module."):]: v for k, v in sd.items()}
  return sd, step


def _add_aliases(sd: dict[str, np.ndarray], backbone: str) -> dict[str, np.ndarray]:
  sd = dict(sd)
  for new, old in _PARAMETRIZED.items():
    if new not in sd and old in sd:
      sd[new] = sd[old]
  if backbone == "resnet50":
    lead = "online_network.feature_layers."
    for k in list(sd):
      if k.startswith(lead):
        idx, _, rest = k[len(lead):].partition(".")
        if idx in _FEATURE_LAYERS:
          named = f"online_network.{_FEATURE_LAYERS[idx]}.{rest}"
          if named not in sd:
            sd[named] = sd[k]
          elif not np.array_equal(sd[named], sd[k]):
            logging.warning("%s differs from its alias %s; using the latter", k, named)
  return sd


def convert(src: str, out_dir: str, config, step: int | None = None) -> dict:
  """Writes OUT_DIR/best/<step> from the original's checkpoint `src`; returns a report."""
  # pylint: disable=import-outside-toplevel
  from eercl_jax import checkpoints, train_lib
  from eercl_jax.models import eercl
  backbone = config.model.backbone
  if backbone not in _BACKBONE_RULE:
    raise ValueError(f"config.model.backbone={backbone!r}: expected 'resnet50' or 'vit'")
  sd, file_step = base_model_state_dict(pretrained.read_checkpoint(src), src)
  sd = _add_aliases(sd, backbone)
  step = file_step if step is None else step
  step = 0 if step is None else int(step)

  model = eercl.create_model(config.model)
  shapes = jax.eval_shape(lambda: eercl.init_variables(model, jax.random.PRNGKey(0),
                                                       config.data.crop))
  expected_tree = {col: shapes[col] for col in ("params", "batch_stats") if col in shapes}
  flat_shapes = traverse_util.flatten_dict(expected_tree)
  values, used, resized = pretrained.convert_arrays(
      sd, {p: s.shape for p, s in flat_shapes.items()}, eercl_rule(backbone), src)
  unexpected = sorted(k for k in sd if k not in used and not _ignorable(k)
                      and k not in _PARAMETRIZED.values())
  if unexpected:
    raise ValueError(f"{src}: {len(unexpected)} arrays have no place in a {backbone} EERCL model "
                     f"(other architecture or sizes?): {', '.join(unexpected[:20])}")
  teacher_diff = sorted(k for k in sd if k.startswith(("target_network.", "target_classifier."))
                        and (o := "online_" + k[len("target_"):]) in sd
                        and not np.array_equal(sd[k], sd[o]))
  if teacher_diff:
    logging.info("%d teacher arrays differ from the online ones; the online weights are used "
                 "for both (as the original's stage 2)", len(teacher_diff))

  state = traverse_util.unflatten_dict(
      {p: jnp.asarray(values[p], flat_shapes[p].dtype) for p in flat_shapes})
  meta = train_lib.run_meta(config, step, {
      "best": {"value": -1.0, "step": step}, "selected_by": "imported",
      "imported_from": os.path.abspath(src)})
  ckpt = checkpoints.RunCheckpoints(out_dir)
  try:
    ckpt.save(step, {"params": state["params"], "batch_stats": state["batch_stats"]},
              {"iterator": None}, meta, best=True)
  finally:
    ckpt.close()
  report = {"step": step, "out_dir": os.path.join(out_dir, "best"),
            "loaded": sorted("/".join(p) for p in values), "resized": resized,
            "ignored": sorted(k for k in sd if k not in used),
            "teacher_differs": teacher_diff}
  logging.info("imported %s (%s, %d arrays, step %d) into %s", src, backbone, len(values), step,
               report["out_dir"])
  return report


def main(argv):
  if len(argv) != 3:
    raise app.UsageError("usage: python -m eercl_jax.tools.import_torch SRC.pth OUT_DIR "
                         "--config=configs/X.py")
  report = convert(argv[1], argv[2], flags.FLAGS.config, flags.FLAGS.step)
  print(f"imported {argv[1]} -> {report['out_dir']}/{report['step']} "
        f"({len(report['loaded'])} arrays; ignored {len(report['ignored'])} file arrays)",
        flush=True)


def _define_flags():
  # Defined here, not at import, so tests and other entry points can import this module.
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file("config", None, "Config whose `model` (and data.crop, class "
                                  "names) describe the network.", lock_config=True)
  flags.DEFINE_integer("step", None, "Step to record (default: the original scheduler's "
                       "last_epoch, else 0).")
  flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
  _define_flags()
  app.run(main)
