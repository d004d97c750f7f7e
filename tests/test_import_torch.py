"""Importing a source model of the original PyTorch EERCL/CRCo code (tools/import_torch.py).

The torch modules below rebuild the original's networks with its attribute names, hence its
state-dict keys (CRCo/models/sfda_models.py: SFDAResNetBase, SFDAClassifier; CRCo/models/
ViTSFDA.py: vit_sfda_basenet on SSRT's timm-compatible ViT; basic_mix_contrastive_model.py: the
online_/target_ network and classifier pairs; DistributedDataParallel adds 'module.'). Random
weights, no download. The converted checkpoint is restored the way stage 2 restores a source run
(`checkpoints.resolve_run_dir` + `check_model_meta` + `restore_variables`, replicated over the
mesh) and must give the same eval-mode features and logits.
"""
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
nn = torch.nn

# pylint: disable=wrong-import-position
from eercl_jax import checkpoints, config_defaults, parallel
from eercl_jax.models import eercl
from eercl_jax import export
from eercl_jax.weights import convert, original, readers
from tests.test_weights import randomize_bn_, randomize_vit_

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4
STEP = 1234


# ----------------------------------------------------------------------------------------------
# The original's modules (names as in the original code; written from its description)

class SFDAResNetBase(nn.Module):
  def __init__(self, bottleneck_dim=256):
    super().__init__()
    r = torchvision.models.resnet50(weights=None)
    self.conv1, self.bn1, self.relu, self.maxpool = r.conv1, r.bn1, r.relu, r.maxpool
    self.layer1, self.layer2, self.layer3, self.layer4 = r.layer1, r.layer2, r.layer3, r.layer4
    self.avgpool = r.avgpool
    self.feature_layers = nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool,
                                        self.layer1, self.layer2, self.layer3, self.layer4,
                                        self.avgpool)
    self.bottleneck = nn.Linear(2048, bottleneck_dim)
    self.bn = nn.BatchNorm1d(bottleneck_dim)

  def forward(self, x):
    return self.bn(self.bottleneck(torch.flatten(self.feature_layers(x), 1)))


class ViTSFDABaseNet(nn.Module):
  def __init__(self, bottleneck_dim=32, width=32, sfda_feat_width=16):
    super().__init__()
    self.base_network = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0,
        num_classes=1000)
    self.bottleneck = nn.Sequential(nn.Linear(64, bottleneck_dim), nn.BatchNorm1d(bottleneck_dim),
                                    nn.ReLU(), nn.Dropout(0.5))
    self.classifier = nn.Sequential(nn.Linear(bottleneck_dim, width), nn.ReLU(), nn.Dropout(0.5))
    self.sfda_bottleneck = nn.Linear(width, sfda_feat_width)
    self.sfda_bn = nn.BatchNorm1d(sfda_feat_width)

  def forward(self, x):
    h = self.base_network.forward_features(x)[:, 0]
    return self.sfda_bn(self.sfda_bottleneck(self.classifier(self.bottleneck(h))))


class SFDAClassifier(nn.Module):
  def __init__(self, num_class=7, bottleneck_dim=256):
    super().__init__()
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")      # torch.nn.utils.weight_norm is deprecated
      self.fc = torch.nn.utils.weight_norm(nn.Linear(bottleneck_dim, num_class), name="weight")

  def forward(self, x):
    return self.fc(x)


class ContrastiveModel(nn.Module):
  def __init__(self, make_net, make_cls):
    super().__init__()
    self.online_network, self.target_network = make_net(), make_net()
    self.online_classifier, self.target_classifier = make_cls(), make_cls()


class DDP(nn.Module):
  def __init__(self, module):
    super().__init__()
    self.module = module


def randomize_head_(model, seed):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("weight_g"):
        p.copy_(torch.rand(p.shape, generator=g) + 0.5)
      elif p.ndim <= 2 and ("bottleneck" in name or "classifier" in name or "fc" in name):
        p.add_(0.05 * torch.randn(p.shape, generator=g))
  randomize_bn_(model, seed)


def build_original(kind, seed=0):
  torch.manual_seed(seed)
  if kind == "resnet":
    model = ContrastiveModel(SFDAResNetBase, SFDAClassifier)
  else:
    model = ContrastiveModel(ViTSFDABaseNet, lambda: SFDAClassifier(7, 16))
    randomize_vit_(model.online_network.base_network, seed)
    randomize_vit_(model.target_network.base_network, seed + 1)
  randomize_head_(model, seed)
  return DDP(model).eval()


def save_original(ddp, path, with_optimizer=False):
  ckpt = {"base_model": ddp.state_dict(),
          "base_model_scheduler": {"last_epoch": STEP, "_step_count": STEP + 1,
                                   "base_lrs": [1e-3, 1e-2, 1e-2, 1e-2], "gamma": 0.005,
                                   "power": 0.75, "_last_lr": [1e-4], "verbose": False}}
  if with_optimizer:
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    ddp.module.online_network.sfda_bn.weight.sum().backward()
    opt.step()
    ckpt["base_model_optimizer"] = opt.state_dict()
  torch.save(ckpt, path)


def source_config(kind):
  c = config_defaults.source_config(source="raf", target="ck")
  c.model.backbone = kind
  if kind == "vit":
    c.model.size = "mu/8"
    c.model.bottleneck_dim, c.model.width, c.model.feat_dim = 32, 32, 16
    c.data.crop = 32
  else:
    c.data.crop = 64
  return c


def torch_outputs(ddp, x):
  m = ddp.module
  with torch.no_grad():
    feat = m.online_network(x)
    return feat.numpy(), m.online_classifier(feat).numpy()


def restore_and_apply(config, out_dir, x):
  directory = checkpoints.resolve_run_dir(out_dir, "best")
  assert directory == os.path.join(out_dir, "best")
  _, meta = checkpoints.read_meta(directory)
  checkpoints.check_model_meta(meta, config, directory)
  model = eercl.create_model(config.model)
  variables, step = checkpoints.restore_variables(
      directory, model, config.data.crop, parallel.replicated(parallel.create_mesh()))
  feat, logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(
      variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
  return np.asarray(feat), np.asarray(logits), step, variables


# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet_original(tmp_path_factory):
  ddp = build_original("resnet")
  path = str(tmp_path_factory.mktemp("orig_r50") / "best_model.pth")
  save_original(ddp, path)
  x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
  return ddp, path, x


@pytest.fixture(scope="module")
def vit_original(tmp_path_factory):
  ddp = build_original("vit")
  path = str(tmp_path_factory.mktemp("orig_vit") / "best_model.pth")
  save_original(ddp, path, with_optimizer=True)
  x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
  return ddp, path, x


@pytest.mark.slow
def test_resnet_source_model_import(resnet_original, tmp_path):
  ddp, path, x = resnet_original
  keys = set(ddp.state_dict())
  # The layout the converter relies on, as the original's modules produce it.
  assert {"module.online_network.conv1.weight",
          "module.online_network.feature_layers.4.0.conv1.weight",
          "module.online_network.bottleneck.weight", "module.online_network.bn.running_var",
          "module.online_classifier.fc.weight_g", "module.online_classifier.fc.weight_v",
          "module.target_classifier.fc.bias"} <= keys
  cfg = source_config("resnet")
  out = str(tmp_path / "imported")
  report = original.import_checkpoint(path, out, cfg)
  assert report["step"] == STEP and os.path.isdir(os.path.join(out, "best", str(STEP)))
  assert any(k.startswith("target_network.") for k in report["ignored"])
  ref_feat, ref_logits = torch_outputs(ddp, x)
  feat, logits, step, variables = restore_and_apply(cfg, out, x)
  assert step == STEP and logits.shape == (2, 7)
  np.testing.assert_allclose(feat, ref_feat, atol=TOL, rtol=0)
  np.testing.assert_allclose(logits, ref_logits, atol=TOL, rtol=0)
  g = ddp.module.online_classifier.fc.weight_g.detach().numpy()
  np.testing.assert_array_equal(np.asarray(variables["params"]["classifier"]["g"]), g[:, 0])


def test_resnet_feature_layers_only(resnet_original, tmp_path):
  """A state dict with only the `feature_layers.N` aliases converts to the same arrays."""
  ddp, _, _ = resnet_original
  sd = {k: v for k, v in ddp.state_dict().items()
        if not any(f"online_network.{n}." in k for n in
                   ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"))}
  path = str(tmp_path / "aliases.pth")
  torch.save({"base_model": sd}, path)
  report = original.import_checkpoint(path, str(tmp_path / "out"), source_config("resnet"))
  assert report["step"] == 0 and len(report["loaded"]) == 6 + 265 + 3


@pytest.mark.slow
def test_vit_source_model_import_cli_and_export(vit_original, tmp_path):
  ddp, path, x = vit_original
  cfg_file = tmp_path / "cfg.py"
  cfg_file.write_text(                # self-contained: the CLI process imports no torch
      "from eercl_jax import config_defaults\n\n"
      "def get_config():\n"
      "  c = config_defaults.source_config(source='raf', target='ck')\n"
      "  c.model.size = 'mu/8'\n"
      "  c.model.bottleneck_dim, c.model.width, c.model.feat_dim = 32, 32, 16\n"
      "  c.data.crop = 32\n"
      "  return c\n")
  out = str(tmp_path / "imported")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, CUDA_VISIBLE_DEVICES="")
  proc = subprocess.run([sys.executable, "-m", "eercl_jax.tools.import_torch", path, out,
                         f"--config={cfg_file}"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"best/{STEP}" in proc.stdout
  cfg = source_config("vit")
  ref_feat, ref_logits = torch_outputs(ddp, x)
  feat, logits, step, variables = restore_and_apply(cfg, out, x)
  assert step == STEP
  np.testing.assert_allclose(feat, ref_feat, atol=TOL, rtol=0)
  np.testing.assert_allclose(logits, ref_logits, atol=TOL, rtol=0)
  # export_npz: the backbone in public JAX names, read back exactly.
  npz = export.backbone_npz(out, str(tmp_path / "backbone.npz"))
  sd = readers.load_state_dict(npz)
  assert "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel" in sd
  reloaded, report = convert.init_backbone(cfg.model, variables, npz)
  assert report["format"] == "jax_vit" and not report["ignored"]
  for a, b in zip(jax.tree_util.tree_leaves(reloaded), jax.tree_util.tree_leaves(variables)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_vit_import_size_mismatch_is_named(vit_original, tmp_path):
  _, path, _ = vit_original
  cfg = source_config("vit")
  cfg.model.feat_dim = 8
  with pytest.raises(ValueError) as e:
    original.import_checkpoint(path, str(tmp_path / "out"), cfg)
  msg = str(e.value)
  assert "online_network.sfda_bottleneck.weight: expected (32, 8)" in msg
  assert "online_classifier.fc.weight_v: expected (7, 8)" in msg and "found (7, 16)" in msg
  assert not os.path.exists(tmp_path / "out")


def test_not_an_eercl_checkpoint(tmp_path):
  path = str(tmp_path / "plain.pth")
  torch.save({"model": {"w": torch.ones(2)}}, path)
  with pytest.raises(ValueError, match="no 'base_model' entry"):
    original.import_checkpoint(path, str(tmp_path / "out"), source_config("vit"))
