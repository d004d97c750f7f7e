"""Every shipped config loads and validates, and the paper configs carry the original's numbers
(docs/config-keys.md)."""
import glob
import re
import importlib.util
import os

import pytest

from eercl_jax import config_defaults
from eercl_jax.models import registry
from tests.conftest import REPO

# The training configs (configs/bench.py holds the benchmark's settings: tested below).
CONFIGS = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                 if os.path.basename(p) != "bench.py")


def _load(path, arg=None):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)


@pytest.mark.parametrize("path", [p for p in CONFIGS if not p.endswith("__init__.py")],
                         ids=os.path.basename)
def test_config_loads(path):
  c = _load(path)
  assert c.stage in ("source", "adapt")
  assert len(c.data.class_names) == c.model.num_classes == 7
  assert c.data.select_by in c.data.eval_lists
  assert c.batch_size % c.bn_group_size == 0
  config_defaults.validate(c, num_devices=1)


def test_source_raf_is_the_vit_b_recipe():
  c = _load(os.path.join(REPO, "configs", "source_raf.py"))
  assert (c.model.backbone, registry.size_of(c.model), c.data.crop, c.data.resize) == \
      ("vit", "B/16", 224, 256)
  o = c.optim
  assert (o.lr, o.weight_decay, o.momentum, o.nesterov, o.schedule, o.gamma, o.power) == \
      (0.004, 5e-4, 0.9, True, "inv", 0.001, 0.75)
  assert registry.lr_mult(c.model, o) == {"backbone": 0.1, "mlp": 1.0, "bottleneck": 1.0,
                                         "sfda": 10.0, "classifier": 10.0}
  assert (c.batch_size, c.bn_group_size, c.num_steps, c.label_smoothing) == (64, 32, 2000, 0.1)
  assert c.data.select_by == "source"
  assert c.data.train_list == "data/txt/fer/labeled_source_images_raf.txt"
  assert dict(c.data.eval_lists) == {"target": "data/txt/fer/unlabeled_target_images_expw_0.txt",
                                     "source": "data/txt/fer/unlabeled_target_images_raf_0.txt"}


@pytest.mark.parametrize("target", ["expw", "ck", "jaffe", "sfew", "fer2013"])
def test_adapt_configs_carry_the_fer_settings(target):
  c = _load(os.path.join(REPO, "configs", f"adapt_{target}.py"))
  a = c.adapt
  assert c.data.train_list == c.data.eval_lists.target == \
      f"data/txt/fer/unlabeled_target_images_{target}_0.txt"
  assert (c.batch_size, c.bn_group_size, c.virtual_devices) == (64, 32, 2)
  assert (a.ema_decay, a.fix_classifier, a.aad_neighbours, a.refresh_every) == (0.99, True, 4, 50)
  assert (a.mask_threshold, a.class_contrast_temp, a.class_contrast_cluster_labels) == \
      (0.95, 0.07, True)
  assert (a.negative_bank_size, a.instance_nce_weight, a.instance_nce_temp,
          a.class_contrast_weight, a.aad_weight, a.aad_decay_power, a.cluster_min_size,
          a.relation_off_diagonal) == (512, 1.0, 0.07, 1.0, 1.0, 0.0, 0, 1.0)
  assert (c.num_steps, c.eval_every, c.optim.lr, c.optim.weight_decay, c.optim.schedule) == \
      (15000, 300, 4e-4, 5e-4, "constant")
  assert c.data.select_by == "target" and c.seed == 2023


def test_resnet_configs_are_the_original_fer_recipe():
  src = _load(os.path.join(REPO, "configs", "source_raf_r50.py"))
  assert (src.model.backbone, registry.size_of(src.model)) == ("resnet", "50")
  o = src.optim
  assert (o.lr, o.weight_decay, o.schedule, o.gamma, o.power) == (1e-3, 0.01, "inv", 0.005, 0.75)
  assert registry.lr_mult(src.model, o) == {"backbone": 1.0, "bottleneck": 1.0, "mlp": 1.0,
                                            "sfda": 10.0, "classifier": 10.0}
  assert (src.batch_size, src.bn_group_size, src.num_steps, src.eval_every,
          src.checkpoint_every, src.keep_checkpoints) == (128, 128, 20000, 500, 1000, 4)
  ada = _load(os.path.join(REPO, "configs", "adapt_ck_r50.py"))
  assert (ada.optim.lr, ada.optim.weight_decay, ada.optim.schedule) == (1e-4, 1e-3, "constant")
  assert (ada.batch_size, ada.bn_group_size, ada.virtual_devices, ada.num_steps, ada.eval_every,
          ada.checkpoint_every, ada.keep_checkpoints, ada.seed) == \
      (64, 32, 2, 15000, 300, 500, 1, 2023)


@pytest.mark.parametrize("key,value,message", [
    ("bn_group_size", 24, "config.bn_group_size: 24 does not divide config.batch_size=64"),
    ("batch_size", 60, "config.batch_size: 60 is not divisible by the 8 devices"),
    ("eval_batch_size", 100, "config.eval_batch_size: 100 is not divisible by the 8 devices"),
    ("virtual_devices", 3, "config.virtual_devices: 3 does not divide"),
    ("adapt.refresh_batch_size", 12, "config.adapt.refresh_batch_size: 12 is not divisible"),
    ("adapt.refresh_view", "strong", "config.adapt.refresh_view"),
    ("model.backbone", "vgg", "config.model.backbone='vgg': unknown backbone"),
    ("model.size", "Z/16", "config.model.size: unknown ViT size 'Z/16'"),
    ("model.dtype", "float16", "config.model.dtype"),
    ("data.select_by", "nope", "config.data.select_by"),
    ("optim.schedule", "cosine", "config.optim.schedule"),
])
def test_validation_names_the_key(key, value, message):
  c = _load(os.path.join(REPO, "configs", "adapt_ck.py"))
  node, leaf = c, key
  while "." in leaf:
    head, leaf = leaf.split(".", 1)
    node = node[head]
  node[leaf] = value
  with pytest.raises(ValueError, match=re.escape(message)):
    config_defaults.validate(c, num_devices=8)


def test_resnet_size_and_remat_are_config_fields():
  c = _load(os.path.join(REPO, "configs", "demo_source.py"))
  c.model.backbone, c.model.size, c.model.remat = "resnet", "mu", True
  config_defaults.validate(c, num_devices=1)
  from eercl_jax.models import eercl  # pylint: disable=import-outside-toplevel
  model = eercl.create_model(c.model)
  assert (model.backbone, model.size, model.remat) == ("resnet", "mu", True)


@pytest.mark.parametrize("family,arg", [
    ("source", "backbone=resnet"), ("source", "source=raf,target=ck,backbone=vit,runlocal"),
    ("adapt", "target=jaffe,backbone=resnet"), ("adapt", "target=ck,backbone=resnet,runlocal"),
    ("demo_source", "runlocal"), ("demo_adapt", "runlocal")])
def test_config_families_take_arguments(family, arg):
  c = _load(os.path.join(REPO, "configs", f"{family}.py"), arg)
  config_defaults.validate(c, num_devices=1)
  if "backbone=resnet" in arg:
    assert c.model.backbone == "resnet"
  if "runlocal" in arg:   # the dry run: tiny model, 32 px, float32, synthetic data, few steps
    assert registry.size_of(c.model) == registry.get(c.model.backbone).test_size
    assert (c.data.crop, c.model.dtype, c.model.init_from) == (32, "float32", "")
    assert c.data.synthetic.enabled and "synth_" in c.data.train_list
    assert (c.batch_size, c.num_steps) == (32, 10)


def test_demo_adaptation_runs_any_method_with_its_authors_optimiser():
  demo = os.path.join(REPO, "configs", "demo_adapt.py")
  eercl = _load(demo)
  assert (eercl.method, eercl.optim.lr, eercl.bn_group_size) == ("eercl", 0.002, 32)
  for method in ("source_only", "adabn", "tent", "shot", "nrc", "aad"):
    c = _load(demo, f"method={method}")
    config_defaults.validate(c, num_devices=1)
    recipe = _load(os.path.join(REPO, "configs", "adapt.py"), f"method={method}")
    assert c.method == method and c.optim.to_dict() == recipe.optim.to_dict(), method
    assert c.bn_group_size == c.batch_size == 64 and c.num_steps == eercl.num_steps


def test_family_files_are_the_named_configs():
  for name, family, arg in (("source_raf", "source", "source=raf"),
                            ("source_raf_r50", "source", "source=raf,backbone=resnet"),
                            ("adapt_expw", "adapt", "target=expw"),
                            ("adapt_ck_r50", "adapt", "target=ck,backbone=resnet")):
    want = _load(os.path.join(REPO, "configs", f"{family}.py"), arg)
    assert _load(os.path.join(REPO, "configs", f"{name}.py")).to_dict() == want.to_dict(), name


def test_family_arguments_are_checked():
  with pytest.raises(ValueError, match="config argument 'taget': unknown; the arguments are "
                                       "backbone, method, runlocal, source, target"):
    _load(os.path.join(REPO, "configs", "adapt.py"), "taget=ck")
  with pytest.raises(ValueError, match="runlocal=.maybe.: expected true or false"):
    _load(os.path.join(REPO, "configs", "adapt.py"), "runlocal=maybe")


@pytest.mark.parametrize("preset", ["cpu", "vit_b16_224", "gpu_check",
                                    os.path.join(REPO, "configs", "adapt_expw.py")])
def test_bench_presets_hold_valid_stage_configs(preset):
  c = _load(os.path.join(REPO, "configs", "bench.py"), preset)
  stages = [s for s in ("source", "adapt") if s in c]
  assert stages and set(c.bench.stages.split(",")) <= set(stages)
  for stage in stages:
    assert c[stage].stage == stage and c[stage].model.init_from == ""
    config_defaults.validate(c[stage], num_devices=1)
