"""Models: shapes, parameter trees, PyTorch-semantics layers, optimiser groups.

Large backbones are checked with `jax.eval_shape` only (no CPU forward); forwards use tiny sizes.
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from eercl_jax.models import eercl, layers, resnet, vit

TINY_HEAD = dict(bottleneck_dim=32, width=32, feat_dim=16, num_classes=7)
TINY_RESNET = dict(size="mu")


def tiny_vit(**kw):
  return eercl.EERCLModel("vit", size="mu/8", **{**TINY_HEAD, **kw})


def tiny_resnet(**kw):
  return eercl.EERCLModel("resnet", **{**TINY_HEAD, **TINY_RESNET, **kw})


def images(n=8, size=32, seed=0):
  return jax.random.normal(jax.random.key(seed), (n, size, size, 3), jnp.float32)


def shape_tree(model, size=224):
  init = functools.partial(model.init, train=False)
  return jax.eval_shape(init, jax.random.key(0),
                        jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))


@functools.lru_cache(maxsize=None)
def jitted(model, train, bn_groups=1):
  """One compiled forward per (model, mode, groups): CPU compiles dominate these tests."""
  if not train:
    return jax.jit(lambda v, x: model.apply(v, x, train=False))
  return jax.jit(lambda v, x, key: model.apply(v, x, train=True, bn_groups=bn_groups,
                                               rngs={"dropout": key}, mutable=["batch_stats"]))


def train_apply(model, variables, x, seed=0, bn_groups=1):
  return jitted(model, True, bn_groups)(variables, x, jax.random.key(seed))


# Initialised once per module: the jitted init is the slowest compile here. The non-partitionable
# threefry compiles the ResNet's many initialisers ~3x faster on CPU; values do not matter here.
@pytest.fixture(scope="module")
def vit_variables():
  with jax.threefry_partitionable(False):
    return eercl.init_variables(tiny_vit(), jax.random.key(0), 32, batch=2)


@pytest.fixture(scope="module")
def resnet_variables():
  with jax.threefry_partitionable(False):
    return eercl.init_variables(tiny_resnet(), jax.random.key(0), 32, batch=2)


# ----------------------------------------------------------------------------------- layers

def numpy_grouped_bn(x, groups, scale, bias, eps=1e-5):
  """Independent reference: per-group PyTorch train-mode BN and the running-stat update."""
  x = np.asarray(x, np.float64)
  parts, means, unbiased = [], [], []
  for g in np.split(x, groups, axis=0):
    flat = g.reshape(-1, g.shape[-1])
    m, v = flat.mean(0), flat.var(0)
    parts.append((g - m) / np.sqrt(v + eps) * scale + bias)
    means.append(m)
    unbiased.append(flat.var(0, ddof=1))
  run_mean = 0.9 * 0.0 + 0.1 * np.mean(means, 0)
  run_var = 0.9 * 1.0 + 0.1 * np.mean(unbiased, 0)
  return np.concatenate(parts, 0), run_mean, run_var


@pytest.mark.parametrize("shape,groups", [((8, 5), 1), ((8, 5), 2), ((6, 3, 3, 4), 3)])
def test_grouped_bn_matches_numpy(shape, groups):
  bn = layers.GroupedBatchNorm()
  x = 3.0 * jax.random.normal(jax.random.key(1), shape) + 2.0
  variables = bn.init(jax.random.key(0), x, train=True, groups=groups)
  f = shape[-1]
  scale = np.linspace(0.5, 1.5, f).astype(np.float32)
  bias = np.linspace(-1, 1, f).astype(np.float32)
  variables = {"params": {"scale": scale, "bias": bias}, "batch_stats": variables["batch_stats"]}
  y, upd = bn.apply(variables, x, train=True, groups=groups, mutable=["batch_stats"])
  want_y, want_mean, want_var = numpy_grouped_bn(x, groups, scale, bias)
  np.testing.assert_allclose(y, want_y, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(upd["batch_stats"]["mean"], want_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(upd["batch_stats"]["var"], want_var, rtol=1e-5, atol=1e-6)

  # Eval uses the running statistics, not the batch's.
  ev = {"params": variables["params"], "batch_stats": upd["batch_stats"]}
  y_eval = bn.apply(ev, x, train=False)
  want_eval = ((np.asarray(x) - want_mean) / np.sqrt(want_var + 1e-5)) * scale + bias
  np.testing.assert_allclose(y_eval, want_eval, rtol=1e-4, atol=1e-4)


def test_grouped_bn_groups_matter_and_init_keeps_stats():
  bn = layers.GroupedBatchNorm()
  # Two halves with different distributions: per-half statistics differ from the whole batch's.
  x = jnp.concatenate([jax.random.normal(jax.random.key(0), (4, 3)),
                       5.0 + 2.0 * jax.random.normal(jax.random.key(1), (4, 3))])
  v = bn.init(jax.random.key(0), x, train=True, groups=2)
  np.testing.assert_array_equal(v["batch_stats"]["mean"], 0.0)   # init does not update
  np.testing.assert_array_equal(v["batch_stats"]["var"], 1.0)
  y1, _ = bn.apply(v, x, train=True, groups=1, mutable=["batch_stats"])
  y2, _ = bn.apply(v, x, train=True, groups=2, mutable=["batch_stats"])
  assert not np.allclose(y1, y2, atol=1e-2)
  with pytest.raises(ValueError, match="equal groups"):
    bn.apply(v, x, train=True, groups=3, mutable=["batch_stats"])


def test_grouped_bn_independent_of_device_count():
  """The point of fixed groups: the same numbers with the batch on 1 or on 8 devices."""
  bn = layers.GroupedBatchNorm()
  x = jax.random.normal(jax.random.key(2), (16, 6)) * jnp.arange(1, 17)[:, None]
  v = bn.init(jax.random.key(0), x, train=True, groups=2)
  step = jax.jit(lambda v, x: bn.apply(v, x, train=True, groups=2, mutable=["batch_stats"]))
  y1, s1 = step(v, x)
  mesh = jax.make_mesh((len(jax.devices()),), ("data",))
  xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  y8, s8 = step(v, xs)
  np.testing.assert_allclose(y1, y8, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(s1["batch_stats"]["var"], s8["batch_stats"]["var"], rtol=1e-6)


def test_weight_norm_dense_init_and_formula():
  wn = layers.WeightNormDense(7)
  x = jax.random.normal(jax.random.key(3), (5, 256))
  p = wn.init(jax.random.key(4), x)["params"]
  assert p["v"].shape == (7, 256) and p["g"].shape == (7,) and p["b"].shape == (7,)
  bound = 1 / np.sqrt(256)
  assert np.all(np.abs(p["v"]) <= bound) and np.abs(p["v"]).max() > 0.9 * bound
  np.testing.assert_allclose(p["g"], np.linalg.norm(p["v"], axis=1), rtol=1e-6)
  np.testing.assert_array_equal(p["b"], 0.0)
  # With g = ||v|| the initial effective weight is v itself.
  np.testing.assert_allclose(wn.apply({"params": p}, x), np.asarray(x) @ np.asarray(p["v"]).T,
                             rtol=1e-4, atol=1e-5)

  rng = np.random.default_rng(0)
  v = rng.normal(size=(7, 256)).astype(np.float32)
  g = rng.uniform(0.5, 2, size=7).astype(np.float32)
  b = rng.normal(size=7).astype(np.float32)
  got = wn.apply({"params": {"v": v, "g": g, "b": b}}, x)
  want = np.asarray(x, np.float64) @ (g[:, None] * v / np.linalg.norm(v, axis=1,
                                                                      keepdims=True)).T + b
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------------------- backbones

def test_vit_sizes():
  assert vit.parse_vit_size("B/16") == dict(patch_size=16, width=768, depth=12, mlp_dim=3072,
                                            num_heads=12)
  assert vit.VIT_SIZES["Ti/16"]["width"] == 192 and vit.VIT_SIZES["S/16"]["num_heads"] == 6
  assert vit.VIT_SIZES["L/16"]["depth"] == 24
  assert vit.parse_vit_size("Ti/8")["patch_size"] == 8
  assert vit.parse_vit_size("mu/8")["width"] == 64
  assert vit.parse_vit_size("S/7")["patch_size"] == 7     # any patch size parses
  for bad in ("B16", "X/16", "B/"):
    with pytest.raises(ValueError):
      vit.parse_vit_size(bad)


def test_vit_b16_param_tree_matches_checkpoint_names():
  params = shape_tree(eercl.EERCLModel("vit", size="B/16"))["params"]
  bb = params["backbone"]
  # ViT-B/16 without its 1000-way head: 86,567,656 - 769,000.
  assert eercl.count_params(bb) == 85_798_656
  assert set(bb) == {"embedding", "cls", "Transformer"}
  assert bb["embedding"]["kernel"].shape == (16, 16, 3, 768)
  assert bb["cls"].shape == (1, 1, 768)
  tr = bb["Transformer"]
  assert set(tr) == {"posembed_input", "encoder_norm"} | {f"encoderblock_{i}" for i in range(12)}
  assert tr["posembed_input"]["pos_embedding"].shape == (1, 197, 768)
  blk = tr["encoderblock_0"]
  assert set(blk) == {"LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2",
                      "MlpBlock_3"}
  att = blk["MultiHeadDotProductAttention_1"]
  for name in ("query", "key", "value"):
    assert att[name]["kernel"].shape == (768, 12, 64) and att[name]["bias"].shape == (12, 64)
  assert att["out"]["kernel"].shape == (12, 64, 768)
  assert blk["MlpBlock_3"]["Dense_0"]["kernel"].shape == (768, 3072)
  assert blk["MlpBlock_3"]["Dense_1"]["kernel"].shape == (3072, 768)
  # The ViT head stack (docs/method.md#model-backbones-and-head-stacks).
  assert set(params) == {"backbone", "bottleneck", "bottleneck_bn", "mlp", "sfda_bottleneck",
                         "sfda_bn", "classifier"}
  assert params["bottleneck"]["kernel"].shape == (768, 1024)
  assert params["mlp"]["kernel"].shape == (1024, 1024)
  assert params["sfda_bottleneck"]["kernel"].shape == (1024, 256)
  assert params["classifier"]["v"].shape == (7, 256)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))


def test_resnet50_param_tree():
  tree = shape_tree(eercl.EERCLModel("resnet", size="50"))
  bb = tree["params"]["backbone"]
  assert eercl.count_params(bb) == 23_508_032            # torchvision resnet50 without fc
  assert bb["conv1"]["kernel"].shape == (7, 7, 3, 64)
  assert {f"layer{s}_{b}" for s, n in zip(range(1, 5), (3, 4, 6, 3)) for b in range(n)} \
      <= set(bb)
  assert set(bb["layer1_0"]) == {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3",
                                 "downsample_conv", "downsample_bn"}
  assert "downsample_conv" not in bb["layer1_1"]
  assert bb["layer4_0"]["conv2"]["kernel"].shape == (3, 3, 512, 512)
  assert tree["batch_stats"]["backbone"]["bn1"]["var"].shape == (64,)
  assert set(tree["params"]) == {"backbone", "sfda_bottleneck", "sfda_bn", "classifier"}
  assert tree["params"]["sfda_bottleneck"]["kernel"].shape == (2048, 256)


def test_resnet_stride_on_3x3_conv(resnet_variables):
  """torchvision v1.5: in a downsampling block conv1 keeps the resolution, conv2 halves it."""
  net = resnet.ResNet(stage_sizes=(1, 1, 1, 1), base_width=8)
  v = {k: resnet_variables[k]["backbone"] for k in ("params", "batch_stats")}
  out, state = jax.jit(lambda v, x: net.apply(v, x, train=False, capture_intermediates=True,
                                               mutable=["intermediates"]))(v, images(2, 32))
  blk = state["intermediates"]["layer2_0"]
  assert blk["conv1"]["__call__"][0].shape == (2, 8, 8, 16)
  assert blk["conv2"]["__call__"][0].shape == (2, 4, 4, 16)
  assert out.shape == (2, net.out_features) == (2, 256)


@pytest.mark.parametrize("make,init", [(tiny_vit, "vit_variables"),
                                       (tiny_resnet, "resnet_variables")], ids=["vit", "resnet"])
@pytest.mark.slow
def test_eercl_shapes_determinism_dropout(make, init, request):
  model, variables = make(), request.getfixturevalue(init)
  assert set(variables) == {"params", "batch_stats"}
  x = images()

  f, logits = jitted(model, False)(variables, x)
  assert f.shape == (8, 16) and logits.shape == (8, 7)
  assert f.dtype == jnp.float32 and logits.dtype == jnp.float32
  f2, logits2 = jitted(model, False)(variables, x)
  np.testing.assert_array_equal(f, f2)
  np.testing.assert_array_equal(logits, logits2)

  (fa, _), upd = train_apply(model, variables, x, seed=1)
  (fb, _), _ = train_apply(model, variables, x, seed=1)
  (fc, _), _ = train_apply(model, variables, x, seed=2)
  np.testing.assert_array_equal(fa, fb)
  assert not np.allclose(fa, f)                      # batch statistics, not running ones
  changed = jax.tree_util.tree_map(lambda a, b: bool(np.any(a != b)),
                                   variables["batch_stats"], upd["batch_stats"])
  assert all(jax.tree_util.tree_leaves(changed))    # every BN updated its running stats

  # Same dropout rng, different BN groups: only the statistics differ.
  (g2, _), _ = train_apply(model, variables, x, seed=1, bn_groups=2)
  assert not np.allclose(fa, g2)

  if model.backbone == "vit":
    assert not np.allclose(fa, fc)                   # dropout on in train mode (eval needs no rng)
  else:
    np.testing.assert_array_equal(fa, fc)            # the ResNet head has no dropout


def test_eercl_train_step_on_sharded_batch(vit_variables):
  """A batch sharded over the (explicit) 8-device mesh gives the single-device numbers."""
  model, x = tiny_vit(), images()
  mesh = jax.make_mesh((len(jax.devices()),), ("data",))
  xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  (f1, l1), s1 = train_apply(model, vit_variables, x, bn_groups=2)
  (f8, l8), s8 = train_apply(model, vit_variables, xs, bn_groups=2)
  np.testing.assert_allclose(f1, f8, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(l1, l8, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(s1), jax.tree_util.tree_leaves(s8)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bfloat16_and_remat(vit_variables):
  x = images()
  _, l32 = jitted(tiny_vit(), False)(vit_variables, x)

  bf16 = tiny_vit(dtype=jnp.bfloat16)
  shapes = shape_tree(bf16, 32)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(shapes))
  f16, l16 = jitted(bf16, False)(vit_variables, x)
  assert f16.dtype == jnp.float32 and l16.dtype == jnp.float32
  np.testing.assert_allclose(l16, l32, atol=0.05, rtol=0.05)

  _, lr = jitted(tiny_vit(remat=True), False)(vit_variables, x)
  np.testing.assert_allclose(lr, l32, rtol=1e-5, atol=1e-5)


def test_create_model_from_config():
  cfg = ml_collections.ConfigDict(dict(backbone="vit", size="mu/8", num_classes=5,
                                       bottleneck_dim=24, width=20, feat_dim=12, dropout=0.1,
                                       dtype="bfloat16", init_from=""))
  model = eercl.create_model(cfg)
  assert model.dtype == jnp.bfloat16 and model.num_classes == 5 and model.width == 20
  tree = shape_tree(model, 32)
  assert eercl.class_directions(tree["params"]).shape == (5, 12)
  cfg.dtype = "float16"
  with pytest.raises(ValueError, match="dtype"):
    eercl.create_model(cfg)


@pytest.mark.parametrize("init,groups", [
    ("vit_variables", {"backbone", "bottleneck", "mlp", "sfda", "classifier"}),
    ("resnet_variables", {"backbone", "sfda", "classifier"})], ids=["vit", "resnet"])
def test_param_groups(init, groups, request):
  params = request.getfixturevalue(init)["params"]
  labels = eercl.param_groups(params)
  assert jax.tree_util.tree_structure(labels) == jax.tree_util.tree_structure(params)
  assert set(jax.tree_util.tree_leaves(labels)) == groups
  for top, sub in labels.items():
    assert set(jax.tree_util.tree_leaves(sub)) == {eercl.PARAM_GROUPS[top]}
  if "bottleneck_bn" in labels:
    assert labels["bottleneck_bn"]["scale"] == "bottleneck"
  assert labels["sfda_bn"]["bias"] == "sfda"
  np.testing.assert_array_equal(eercl.class_directions(params), params["classifier"]["v"])

  with pytest.raises(ValueError, match="no optimiser group"):
    eercl.param_groups({**params, "extra": {"w": jnp.zeros(2)}})


def test_param_groups_drive_optax(vit_variables):
  """A zero-lr group leaves its parameters untouched; the others move."""
  params = vit_variables["params"]
  groups = set(eercl.PARAM_GROUPS.values())
  tx = optax.multi_transform({g: optax.sgd(0.0 if g == "backbone" else 1.0) for g in groups},
                             eercl.param_groups)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  assert all(np.all(u == 0) for u in jax.tree_util.tree_leaves(updates["backbone"]))
  for name in ("bottleneck", "mlp", "sfda_bn", "classifier"):
    assert all(np.all(u != 0) for u in jax.tree_util.tree_leaves(updates[name]))


def test_count_params():
  tree = {"a": jnp.zeros((2, 3)), "b": [jnp.zeros(4), jax.ShapeDtypeStruct((5,), jnp.float32)]}
  assert eercl.count_params(tree) == 15
