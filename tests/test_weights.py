"""Pretrained weights (`eercl_jax.weights`): torch-free readers, converters against real timm /
torchvision models (random weights, no download), layout detection from the registry,
position-embedding resizing, the .npz round trip, and clear errors - including pickles that try to
run code.

torch, torchvision and timm are test-only dependencies (requirements-dev.txt).
"""
import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
safetensors_torch = pytest.importorskip("safetensors.torch")

# pylint: disable=wrong-import-position
from eercl_jax.models import eercl, registry, resnet, vit
from eercl_jax.weights import convert, posemb, readers, torch_pickle

VIT_CFG = ml_collections.ConfigDict({"backbone": "vit"})
R50_CFG = ml_collections.ConfigDict({"backbone": "resnet"})
TINY_HEAD = dict(bottleneck_dim=32, width=32, feat_dim=16, num_classes=7)
TOL = 1e-4


def to_np(sd):
  return {k: v.detach().numpy().copy() for k, v in sd.items()}


def randomize_vit_(model, seed):
  """timm's init leaves biases 0 and norms 1: perturb everything so each array matters."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if "norm" in name and name.endswith("weight"):
        p.copy_(1 + 0.2 * noise)
      elif name in ("cls_token", "pos_embed"):
        p.copy_(0.5 * noise)
      else:
        p.add_(0.05 * noise)


def randomize_bn_(model, seed):
  """Random BN affine parameters and running statistics (eval mode uses them)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for mod in model.modules():
      if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):  # pylint: disable=protected-access
        n = mod.num_features
        mod.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
        mod.bias.copy_(torch.randn(n, generator=g) * 0.1)
        mod.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
        mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def tiny_timm_vit(depth=2, img_size=32, seed=0):
  torch.manual_seed(seed)
  m = timm.models.vision_transformer.VisionTransformer(
      img_size=img_size, patch_size=8, embed_dim=64, depth=depth, num_heads=2, mlp_ratio=2.0,
      num_classes=10)
  randomize_vit_(m, seed)
  return m.eval()


def eercl_vit_shapes(size=32):
  """EERCLModel ('mu/8' = timm embed 64, depth 2, heads 2, mlp 128) variable shapes: the loader
  replaces the backbone leaves, so no initialisation has to run."""
  model = eercl.EERCLModel("vit", size="mu/8", **TINY_HEAD)
  return dict(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                jnp.zeros((1, size, size, 3)), train=False)))


def resnet_shapes():
  s = jax.eval_shape(lambda: resnet.ResNet().init(jax.random.PRNGKey(0),
                                                  jnp.zeros((1, 64, 64, 3)), train=False))
  return {"params": {"backbone": s["params"]}, "batch_stats": {"backbone": s["batch_stats"]}}


_vit_forward = jax.jit(lambda p, x: vit.VisionTransformer.from_size("mu/8").apply(
    {"params": p}, x, train=False))


def nhwc(x):
  return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


# ----------------------------------------------------------------------------------------------
# Fixtures (module scope: torch models and JAX compiles are the slow parts)

@pytest.fixture(scope="module")
def timm_vit():
  m = tiny_timm_vit()
  x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    feats = m.forward_features(x)[:, 0].numpy()     # CLS token after the final LayerNorm
  return m, x, feats


@pytest.fixture(scope="module")
def timm_vit_file(timm_vit, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("timm") / "vit.pth")
  torch.save(timm_vit[0].state_dict(), path)
  return path


@pytest.fixture(scope="module")
def loaded_vit(timm_vit_file):
  return convert.init_backbone(VIT_CFG, eercl_vit_shapes(), timm_vit_file)


@pytest.fixture(scope="module")
def vit_npz(loaded_vit, tmp_path_factory):
  """A public-layout .npz (with an ImageNet-21k style head) made from the converted weights."""
  variables, _ = loaded_vit
  sd = convert.backbone_state_dict(variables, "vit")
  sd["head/kernel"] = np.ones((64, 10), np.float32)
  sd["head/bias"] = np.zeros((10,), np.float32)
  path = str(tmp_path_factory.mktemp("npz") / "vit.npz")
  np.savez(path, **sd)
  return path, sd


@pytest.fixture(scope="module")
def torch_resnet50(tmp_path_factory):
  torch.manual_seed(0)
  m = torchvision.models.resnet50(weights=None).eval()
  randomize_bn_(m, 0)
  path = str(tmp_path_factory.mktemp("r50") / "resnet50.pth")
  torch.save(m.state_dict(), path)                  # with fc: the loader must ignore it
  m.fc = torch.nn.Identity()
  x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    feats = m(x).numpy()                           # eval-mode 2048-d pooled features
  return path, x, feats


# ----------------------------------------------------------------------------------------------
# Parity with timm / torchvision

def test_timm_vit_features_match(timm_vit, loaded_vit):
  _, x, ref = timm_vit
  variables, report = loaded_vit
  out = np.asarray(_vit_forward(variables["params"]["backbone"], nhwc(x)))
  assert out.shape == ref.shape == (3, 64)
  np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)
  assert report["format"] == "timm_vit"
  assert report["ignored"] == ["head.bias", "head.weight"]
  assert report["mismatched"] == []
  n_backbone = len(jax.tree_util.tree_leaves(variables["params"]["backbone"]))
  assert len(report["loaded"]) == n_backbone
  assert all(p.startswith("params/backbone/") for p in report["loaded"])
  fresh = report["newly_initialised"]
  assert "params/classifier/v" in fresh and "batch_stats/sfda_bn/mean" in fresh
  assert not any("/backbone/" in p for p in fresh)


@pytest.mark.slow
def test_torchvision_resnet50_features_match(torch_resnet50):
  path, x, ref = torch_resnet50
  variables, report = convert.init_backbone(R50_CFG, resnet_shapes(), path)
  assert report["format"] == "torchvision_resnet"
  assert {"fc.weight", "fc.bias", "bn1.num_batches_tracked"} <= set(report["ignored"])
  assert "batch_stats/backbone/layer4_2/bn3/var" in report["loaded"]
  out = jax.jit(lambda v, x: resnet.ResNet().apply(v, x, train=False))(
      {"params": variables["params"]["backbone"],
       "batch_stats": variables["batch_stats"]["backbone"]}, nhwc(x))
  assert out.shape == (2, 2048)
  np.testing.assert_allclose(np.asarray(out), ref, atol=TOL, rtol=0)


def test_resnet_export_round_trip(torch_resnet50, tmp_path):
  path, _, _ = torch_resnet50
  variables, _ = convert.init_backbone(R50_CFG, resnet_shapes(), path)
  out = convert.export_backbone_npz(variables, R50_CFG, str(tmp_path / "r50.npz"))
  exported = readers.load_state_dict(out)
  original = readers.load_state_dict(path)
  assert set(exported) == {k for k in original
                           if not k.startswith("fc.") and "num_batches" not in k}
  for k, v in exported.items():
    np.testing.assert_array_equal(v, original[k])


# ----------------------------------------------------------------------------------------------
# .npz (public JAX names): round trip, resizing

def test_npz_round_trip_is_exact(vit_npz, tmp_path):
  path, sd = vit_npz
  variables, report = convert.init_backbone(VIT_CFG, eercl_vit_shapes(), path)
  assert report["format"] == "jax_vit"
  assert report["ignored"] == ["head/bias", "head/kernel"]
  out = convert.export_backbone_npz(variables, VIT_CFG, str(tmp_path / "out.npz"))
  with np.load(out) as z:
    exported = {k: z[k] for k in z.files}
  assert set(exported) == {k for k in sd if not k.startswith("head/")}
  for k, v in exported.items():
    assert v.dtype == sd[k].dtype
    np.testing.assert_array_equal(v, sd[k])


def test_npz_loads_into_larger_image_with_resized_pos_embedding(vit_npz):
  path, sd = vit_npz
  variables, report = convert.init_backbone(VIT_CFG, eercl_vit_shapes(size=64), path)
  pos = np.asarray(variables["params"]["backbone"]["Transformer"]["posembed_input"]
                   ["pos_embedding"])
  assert pos.shape == (1, 65, 64)
  old = sd["Transformer/posembed_input/pos_embedding"]
  np.testing.assert_array_equal(pos[:, 0], old[:, 0])          # CLS untouched
  assert len(report["mismatched"]) == 1 and "(1, 17, 64)" in report["mismatched"][0]
  # Matches timm's own interpolation of the grid (bilinear, align_corners=False) to ~1e-6
  # where no antialiasing is involved (upsampling).
  grid = torch.from_numpy(old[:, 1:].reshape(1, 4, 4, 64)).permute(0, 3, 1, 2)
  ref = torch.nn.functional.interpolate(grid, size=(8, 8), mode="bilinear",
                                        align_corners=False).permute(0, 2, 3, 1).reshape(1, 64, 64)
  np.testing.assert_allclose(pos[:, 1:], ref.numpy(), atol=1e-5)


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
def test_resize_pos_embedding(method):
  rng = np.random.default_rng(0)
  pos = rng.normal(size=(1, 17, 8)).astype(np.float32)
  out = posemb.resize_pos_embedding(pos, (8, 8), method=method)
  assert out.shape == (1, 65, 8) and out.dtype == np.float32
  np.testing.assert_array_equal(out[:, 0], pos[:, 0])
  const = np.concatenate([rng.normal(size=(1, 1, 8)), np.full((1, 16, 8), 0.37)], 1)
  for grid in [(8, 8), (2, 2), (3, 5)]:
    res = posemb.resize_pos_embedding(const.astype(np.float32), grid, method=method)
    assert res.shape == (1, 1 + grid[0] * grid[1], 8)
    np.testing.assert_allclose(res[:, 1:], 0.37, atol=1e-6)
  # token count form, and the identity when the grid is unchanged
  np.testing.assert_array_equal(posemb.resize_pos_embedding(pos, 17, method=method), pos)
  with pytest.raises(ValueError, match="square"):
    posemb.resize_pos_embedding(pos, 20)


# ----------------------------------------------------------------------------------------------
# Readers

def test_readers_agree_across_formats(timm_vit, tmp_path):
  m = timm_vit[0]
  ref = to_np(m.state_dict())
  legacy = str(tmp_path / "legacy.pth")
  torch.save(m.state_dict(), legacy, _use_new_zipfile_serialization=False)
  st = str(tmp_path / "vit.safetensors")
  safetensors_torch.save_file({k: v.contiguous() for k, v in m.state_dict().items()}, st)
  wrapped = str(tmp_path / "wrapped.bin")      # a training checkpoint holding the state dict
  torch.save({"state_dict": m.state_dict(), "epoch": 3, "opt": {"lr": 0.1}}, wrapped)
  for path in (legacy, st, wrapped):
    sd = readers.load_state_dict(path)
    assert set(sd) == set(ref), path
    for k in ref:
      np.testing.assert_array_equal(sd[k], ref[k])


def test_reader_dtypes_views_and_parameters(tmp_path):
  t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
  obj = {"t": t.t(),                                  # non-contiguous view
         "s": t[1:, 2:],                              # storage offset
         "bf16": torch.tensor([1.5, -2.25], dtype=torch.bfloat16),
         "f16": torch.tensor([0.5], dtype=torch.float16),
         "i64": torch.tensor(7), "b": torch.tensor([True, False]),
         "p": torch.nn.Parameter(torch.ones(2)), "empty": torch.zeros(0, 3),
         "nested": {"x": [torch.ones(1), 2]}}
  path = str(tmp_path / "misc.pth")
  torch.save(obj, path)
  for p in (path,):
    got = readers.read_checkpoint(p)
    np.testing.assert_array_equal(got["t"], t.t().numpy())
    np.testing.assert_array_equal(got["s"], t[1:, 2:].numpy())
    assert got["bf16"].dtype == torch_pickle.BFLOAT16
    np.testing.assert_array_equal(got["bf16"].astype(np.float32), [1.5, -2.25])
    assert got["f16"].dtype == np.float16 and got["i64"].shape == () and got["i64"] == 7
    assert got["b"].dtype == np.bool_ and got["empty"].shape == (0, 3)
    assert got["nested"]["x"][1] == 2
  flat = readers.load_state_dict(path)
  assert "nested.x.0" in flat and "t" in flat


# ----------------------------------------------------------------------------------------------
# Errors

def _save_sd(sd, path):
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, path)
  return path


def test_missing_and_misshapen_keys_are_named(timm_vit, tmp_path):
  sd = to_np(timm_vit[0].state_dict())
  del sd["blocks.1.mlp.fc2.bias"]
  sd["blocks.0.norm1.weight"] = np.ones((65,), np.float32)
  path = _save_sd(sd, str(tmp_path / "bad.pth"))
  with pytest.raises(ValueError) as e:
    convert.init_backbone(VIT_CFG, eercl_vit_shapes(), path)
  msg = str(e.value)
  assert path in msg
  assert "missing: blocks.1.mlp.fc2.bias" in msg
  assert "blocks.0.norm1.weight: expected (64,)" in msg and "found (65,)" in msg


def test_wider_model_in_file_is_a_mismatch(tmp_path):
  sd = to_np(timm.models.vision_transformer.VisionTransformer(
      img_size=32, patch_size=8, embed_dim=96, depth=2, num_heads=2, num_classes=0).state_dict())
  path = _save_sd(sd, str(tmp_path / "wide.pth"))
  with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv\.weight: found \(288, 96\)"):
    convert.init_backbone(VIT_CFG, eercl_vit_shapes(), path)


def test_deeper_model_in_file_is_an_error(tmp_path):
  sd = to_np(tiny_timm_vit(depth=3).state_dict())
  path = _save_sd(sd, str(tmp_path / "deep.pth"))
  with pytest.raises(ValueError, match=r"no place in the model.*blocks\.2\."):
    convert.init_backbone(VIT_CFG, eercl_vit_shapes(), path)


def test_wrong_architecture(torch_resnet50, timm_vit_file):
  with pytest.raises(ValueError, match="torchvision_resnet weights.*backbone='vit'"):
    convert.init_backbone(VIT_CFG, eercl_vit_shapes(), torch_resnet50[0])
  with pytest.raises(ValueError, match="timm_vit weights.*backbone='resnet'"):
    convert.init_backbone(R50_CFG, resnet_shapes(), timm_vit_file)


def _cut(src, dst):
  data = open(src, "rb").read()
  with open(dst, "wb") as f:
    f.write(data[:len(data) // 2])
  return dst


def test_truncated_files(timm_vit_file, vit_npz, timm_vit, tmp_path):
  st = str(tmp_path / "vit.safetensors")
  safetensors_torch.save_file({k: v.contiguous() for k, v in timm_vit[0].state_dict().items()},
                              st)
  legacy = str(tmp_path / "legacy.pth")
  torch.save(timm_vit[0].state_dict(), legacy, _use_new_zipfile_serialization=False)
  for src in (timm_vit_file, vit_npz[0], st, legacy):
    half = _cut(src, str(tmp_path / ("half_" + os.path.basename(src))))
    with pytest.raises(ValueError, match="truncated") as e:
      readers.load_state_dict(half)
    assert half in str(e.value)


class _Evil:
  """Unpickling this runs a shell command that creates `marker`."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def _evil_files(tmp_path, marker):
  """A payload next to a genuine tensor, in both torch.save formats."""
  obj = {"w": torch.ones(2), "payload": _Evil(marker)}
  zip_path, legacy_path = str(tmp_path / "evil.pth"), str(tmp_path / "evil_legacy.pth")
  torch.save(obj, zip_path)
  torch.save(obj, legacy_path, _use_new_zipfile_serialization=False)
  return zip_path, legacy_path


def test_malicious_pickles_are_rejected_without_running(tmp_path):
  marker = tmp_path / "MARKER"
  for path in _evil_files(tmp_path, marker):
    with pytest.raises(torch_pickle.DisallowedGlobalError) as e:
      readers.load_state_dict(path)
    assert isinstance(e.value, ValueError)
    msg = str(e.value)
    assert path in msg and "system" in msg and "not allowed" in msg, msg
    assert not marker.exists(), path
  # Control: the payload is live - an unrestricted load runs it.
  torch.load(str(tmp_path / "evil.pth"), weights_only=False)
  assert marker.exists()


def test_malicious_init_from_is_rejected(tmp_path):
  marker = tmp_path / "MARKER"
  for path in _evil_files(tmp_path, marker):
    cfg = ml_collections.ConfigDict({"backbone": "vit", "init_from": path})
    with pytest.raises(ValueError, match="system.*not allowed") as e:
      convert.init_backbone(cfg, eercl_vit_shapes(), cfg.init_from)
    assert path in str(e.value)
    assert not marker.exists()


def test_disallowed_global_in_a_rewritten_zip(timm_vit_file, tmp_path):
  # A genuine torch zip whose data.pkl is replaced by a pickle calling os.system.
  marker = tmp_path / "MARKER"
  evil = str(tmp_path / "evil.pth")
  with zipfile.ZipFile(timm_vit_file) as src, zipfile.ZipFile(evil, "w") as dst:
    for info in src.infolist():
      data = src.read(info.filename)
      if info.filename.endswith("data.pkl"):
        data = pickle.dumps({"w": _Evil(marker)}, protocol=2)
      dst.writestr(info, data)
  with pytest.raises(torch_pickle.DisallowedGlobalError) as e:
    readers.load_state_dict(evil)
  assert evil in str(e.value) and "system" in str(e.value)
  assert not marker.exists()
  # A pickled module object (not a state dict) is refused the same way.
  whole = str(tmp_path / "module.pth")
  torch.save(torch.nn.Linear(2, 2), whole)
  with pytest.raises(ValueError, match=r"torch\.nn\.modules\.linear\.Linear"):
    readers.load_state_dict(whole)


# ----------------------------------------------------------------------------------------------
# .safetensors through the safetensors library

def test_safetensors_bfloat16_round_trip(timm_vit, tmp_path):
  ref = torch.tensor([1.5, -2.25, 3.1, 1e-3, -0.0, float("inf")], dtype=torch.bfloat16)
  path = str(tmp_path / "bf16.safetensors")
  safetensors_torch.save_file({"x": ref.reshape(2, 3), "f": torch.ones(2)}, path)
  got = readers.load_state_dict(path)
  assert got["x"].dtype == torch_pickle.BFLOAT16 and got["x"].shape == (2, 3)
  np.testing.assert_array_equal(got["x"].reshape(-1).view(np.uint16),
                                ref.view(torch.int16).numpy().view(np.uint16))   # same bits
  assert got["f"].dtype == np.float32
  # A bf16 checkpoint loads into the float32 model as the bf16 values.
  sd = {k: v.to(torch.bfloat16).contiguous() for k, v in timm_vit[0].state_dict().items()}
  st = str(tmp_path / "vit_bf16.safetensors")
  safetensors_torch.save_file(sd, st)
  variables, report = convert.init_backbone(VIT_CFG, eercl_vit_shapes(), st)
  assert report["format"] == "timm_vit"
  cls = variables["params"]["backbone"]["cls"]
  assert cls.dtype == np.float32
  np.testing.assert_array_equal(cls, sd["cls_token"].float().numpy())


def test_truncated_safetensors_names_the_file(timm_vit, tmp_path):
  full = str(tmp_path / "vit.safetensors")
  safetensors_torch.save_file({k: v.contiguous() for k, v in timm_vit[0].state_dict().items()},
                              full)
  data = open(full, "rb").read()
  for n in (3, 8, 100, len(data) // 2, len(data) - 1):
    cut = str(tmp_path / f"cut{n}.safetensors")
    with open(cut, "wb") as f:
      f.write(data[:n])
    with pytest.raises(ValueError, match="truncated or corrupt") as e:
      readers.load_state_dict(cut)
    assert cut in str(e.value), n


# ----------------------------------------------------------------------------------------------
# Layout detection from the registry

def test_detect_format_uses_registry_formats(timm_vit, torch_resnet50, vit_npz):
  formats = convert.registered_formats()
  assert {n: b for n, (b, _) in formats.items()} == {
      "jax_vit": "vit", "timm_vit": "vit", "torchvision_resnet": "resnet"}
  every = {n: f for n, (_, f) in formats.items()}
  timm_sd = to_np(timm_vit[0].state_dict())
  r50_sd = readers.load_state_dict(torch_resnet50[0])
  npz_sd = vit_npz[1]
  assert convert.detect_format(timm_sd, every) == ("timm_vit", "")
  assert convert.detect_format(r50_sd, every) == ("torchvision_resnet", "")
  assert convert.detect_format(npz_sd, every) == ("jax_vit", "")
  # A prefix is found; the shortest complete backbone wins over a nested copy.
  nested = {**{"module." + k: v for k, v in timm_sd.items()},
            **{"module.ema.model." + k: v for k, v in timm_sd.items()}}
  assert convert.detect_format(nested, every) == ("timm_vit", "module.")
  assert convert.detect_format({"opt/target/" + k: v for k, v in npz_sd.items()},
                               every) == ("jax_vit", "opt/target/")
  # Only the formats passed in are considered: the entry's own, from the registry.
  resnet_only = registry.get("resnet").weight_formats
  assert convert.detect_format(r50_sd, resnet_only) == ("torchvision_resnet", "")
  with pytest.raises(ValueError, match="unknown weight layout") as e:
    convert.detect_format(timm_sd, resnet_only, "where.pth")
  assert "where.pth" in str(e.value) and "layer1.0.conv1.weight" in str(e.value)
  # A name that merely ends like an anchor without a separator is not a match.
  with pytest.raises(ValueError, match="unknown weight layout"):
    convert.detect_format({"xlayer1.0.conv1.weight": np.zeros(1)}, every)
  with pytest.raises(ValueError, match="ambiguous"):
    convert.detect_format({**timm_sd, **r50_sd}, every)


def test_prefixed_keys_and_empty_path(timm_vit, tmp_path):
  sd = {"module." + k: v for k, v in to_np(timm_vit[0].state_dict()).items()}
  path = _save_sd(sd, str(tmp_path / "ddp.pth"))
  variables, report = convert.init_backbone(VIT_CFG, eercl_vit_shapes(), path)
  assert report["prefix"] == "module."
  same, _ = convert.init_backbone(VIT_CFG, variables, "")
  assert same is variables


def test_an_overlapping_view_is_refused_before_it_is_expanded(tmp_path):
  """A stride-0 tensor of 10^8 elements over a 1-element storage: a tiny file that would
  expand to 400 MB. It is refused by name instead."""
  path = str(tmp_path / "expand.pth")
  torch.save({"w": torch.zeros(1).expand(10**8), "ok": torch.ones(3)}, path)
  assert os.path.getsize(path) < 10_000
  with pytest.raises(ValueError, match=r"expand\.pth.*100000000 elements but its storage"):
    readers.load_state_dict(path)
