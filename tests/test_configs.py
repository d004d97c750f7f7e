"""Every shipped config loads, and the paper configs carry the numbers of algorithm.md."""
import glob
import importlib.util
import os

import pytest

from tests.conftest import REPO

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize("path", [p for p in CONFIGS if not p.endswith("__init__.py")],
                         ids=os.path.basename)
def test_config_loads(path):
  c = _load(path)
  assert c.stage in ("source", "adapt")
  assert len(c.data.class_names) == c.model.num_classes == 7
  assert c.data.select_by in c.data.eval_lists
  assert c.batch_size % c.bn_group_size == 0


def test_source_raf_is_the_vit_b_recipe():
  c = _load(os.path.join(REPO, "configs", "source_raf.py"))
  assert (c.model.backbone, c.model.vit_size, c.data.crop, c.data.resize) == ("vit", "B/16", 224, 256)
  o = c.optim
  assert (o.lr, o.weight_decay, o.momentum, o.nesterov, o.schedule, o.gamma, o.power) == \
      (0.004, 5e-4, 0.9, True, "inv", 0.001, 0.75)
  assert dict(o.lr_mult) == {"backbone": 0.1, "mlp": 1.0, "bottleneck": 1.0, "sfda": 10.0,
                             "classifier": 10.0}
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
  assert (a.ema_decay, a.fix_classifier, a.num_k, a.pseudo_update_interval) == (0.99, True, 4, 50)
  assert (a.prob_threshold, a.fixmatch_temp, a.use_cluster_label) == (0.95, 0.07, True)
  assert (a.bank_size, a.lambda_nce, a.nce_temp, a.lambda_fixmatch, a.lambda_aad) == \
      (512, 1.0, 0.07, 1.0, 1.0)
  assert (c.num_steps, c.eval_every, c.optim.lr, c.optim.weight_decay, c.optim.schedule) == \
      (15000, 300, 4e-4, 5e-4, "constant")
  assert c.data.select_by == "target" and c.seed == 2023
