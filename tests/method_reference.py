"""Machinery shared by the reference tests of the adaptation methods (tests/test_method_*.py,
tests/test_adapt_step_reference.py): a helper module, not a test file.

Each test restates its authors' maths (the loss) itself; what lives here is what those
restatements have in common: float64 host copies of parameter trees, PyTorch primitives the
authors' code calls (F.normalize, F.kl_div on probabilities, torch.topk with the self dropped,
BN's running update), the network's train-mode forward with plain BN over the whole batch (the
authors' single GPU), tiny model settings, the random data the steps run on, and the checks that
compare a port's step with a reference's. NRC and AaD (the same authors' code, both on a
feature/score bank) also share their two-step driver and the bank-fill check.
"""
import os
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import adapt as adapt_family
from configs import demo_adapt
from eercl_jax import parallel, train_adapt
from eercl_jax.data import run_lists
from eercl_jax.methods import feature_banks
from eercl_jax.models import eercl
from eercl_jax.models.layers import GroupedBatchNorm
from tests.conftest import assert_trees_close, random_variables, torch_sgd

# The smallest similarity gap at a top-k cut a reference accepts: closer, float32 rounding in the
# port could order the two neighbours either way, and the test would check luck.
MARGIN = 1e-4

# NRC's and AaD's optimiser (Albert0147's lr_scheduler and param groups, from SHOT's code): SGD,
# Nesterov, momentum 0.9, coupled weight decay 1e-3; netF (our backbone) 0.1x, netB and netC
# (every head group, the classifier included) 1x. For conftest.torch_sgd.
NRC_AAD_AUTHORS_SGD = types.SimpleNamespace(
    momentum=0.9, weight_decay=1e-3,
    lr_mult={"backbone": 0.1, "bottleneck": 1.0, "mlp": 1.0, "sfda": 1.0, "classifier": 1.0})


# ------------------------------------------------------------------------------------------------
# models, configs, data

def tiny_model(backbone, *, feat_dim, num_classes, dropout=0.0):
  """The tiny EERCLModel the reference tests run: a 'mu' ResNet or a 'mu/8' ViT (16-wide
  bottleneck), as `set_tiny_model` configures it."""
  if backbone == "resnet":   # BN inside the backbone as well as in the head
    return eercl.EERCLModel("resnet", size="mu", feat_dim=feat_dim, num_classes=num_classes,
                            dropout=dropout)
  return eercl.EERCLModel("vit", size="mu/8", bottleneck_dim=16, width=16, feat_dim=feat_dim,
                          num_classes=num_classes, dropout=dropout)


def set_tiny_model(m, backbone, *, feat_dim, num_classes, dropout=0.0):
  """Sets `config.model` (m) to `tiny_model`'s network, in float32 (the references' dtype)."""
  m.backbone, m.feat_dim, m.num_classes, m.dtype, m.dropout = (
      backbone, feat_dim, num_classes, "float32", dropout)
  m.size = "mu" if backbone == "resnet" else "mu/8"
  m.bottleneck_dim = m.width = 16


def assert_nrc_aad_authors_recipe(config):
  """The NRC/AaD recipe of configs/adapt.py is the authors' optimiser (NRC_AAD_AUTHORS_SGD with
  the lr 1e-3 and SHOT's schedule lr0 (1 + 10 it / T)^-0.75) with BN over the whole batch."""
  o = config.optim
  assert (o.name, o.momentum, o.nesterov, o.weight_decay, o.lr) == ("sgd", 0.9, True, 1e-3, 1e-3)
  assert (o.schedule, o.gamma, o.power) == ("shot", 10.0, 0.75)
  assert config.bn_group_size == config.batch_size


def random_images(rs, n, size):
  """n random uint8 images, size x size RGB."""
  return rs.randint(0, 256, (n, size, size, 3)).astype(np.uint8)


def image_batch(rs, indices, size, num_classes):
  """A one-view batch ('image') of random images for target rows `indices`, random labels (no
  method may read them)."""
  return dict(image=random_images(rs, len(indices), size), index=np.asarray(indices, np.int32),
              label=rs.randint(0, num_classes, len(indices)).astype(np.int32))


def write_target_list(root, images, rs, num_classes):
  """Writes `images` as root/img/NNN.png and their list root/list.txt (random labels: no method
  may read them), in order."""
  os.makedirs(os.path.join(root, "img"))
  rows = []
  for i, img in enumerate(images):
    Image.fromarray(img).save(os.path.join(root, "img", f"{i:03d}.png"))
    rows.append(f"img/{i:03d}.png {rs.randint(0, num_classes)}")
  with open(os.path.join(root, "list.txt"), "w") as f:
    f.write("\n".join(rows) + "\n")


def random_banks(rs, rows, feat_dim, num_classes):
  """Known NRC/AaD banks: random unit features and softmax scores (the batches' rows are
  overwritten by a step)."""
  return feature_banks.Banks(feat=jnp.asarray(l2_normalize(rs.randn(rows, feat_dim)), jnp.float32),
                             score=jnp.asarray(softmax(2 * rs.randn(rows, num_classes)),
                                               jnp.float32))


# ------------------------------------------------------------------------------------------------
# trees and PyTorch primitives, in float64 numpy

def float64_tree(tree):
  """A float64 numpy copy of a tree (the references compute in float64 on the host)."""
  return jax.tree_util.tree_map(lambda x: np.array(x, np.float64), tree)


def float32_tree(tree):
  """A float32 jnp copy of a tree (what the network's forward takes)."""
  return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), tree)


def at_path(tree, path):
  """The node of a nested dict at a key path (strings or jax DictKeys)."""
  for k in path:
    tree = tree[getattr(k, "key", k)]
  return tree


def normalize_images(images, config):
  """The network's input: (image - config.data.mean) / config.data.std in float32."""
  mean = np.asarray(config.data.mean, np.float32)
  std = np.asarray(config.data.std, np.float32)
  return (images.astype(np.float32) - mean) / std


def softmax(x):
  """softmax over the last axis, in float64."""
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def l2_normalize(x):
  """F.normalize: x / max(||x||, 1e-12) over the last axis."""
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def torch_kl_div_of_probs(p, s):
  """F.kl_div(input=p, target=s, reduction='none').sum(-1) with p (B, C) probabilities, not
  log-probabilities, as NRC's and AaD's authors pass them, and s (B, K, C) neighbour scores:
  sum_c s log s - s p (0 log 0 = 0), (B, K)."""
  s_log_s = np.where(s > 0, s * np.log(np.where(s > 0, s, 1.0)), 0.0)
  return (s_log_s - s * p[:, None, :]).sum(-1)


def topk_after_self(sims, k, margin=MARGIN):
  """torch.topk(sims, k + 1)[..., 1:] (the first, the query itself, dropped), checking that no
  cut is a near-tie: rank 0 (self) clear of rank 1, rank k clear of rank k + 1."""
  order = np.argsort(-sims, axis=-1, kind="stable")
  ranked = np.take_along_axis(sims, order, -1)
  assert np.all(ranked[..., 0] - ranked[..., 1] > margin), "self is not a clear top-1"
  assert np.all(ranked[..., k] - ranked[..., k + 1] > margin), "a near-tie at the top-k cut"
  return order[..., 1:k + 1]


def torch_bn_running_stats(stats, bn_inputs):
  """PyTorch's BN running update from each layer's input ({path: x}, one GPU): running =
  0.9 running + 0.1 (batch mean, unbiased batch variance), per feature."""
  new = jax.tree_util.tree_map(np.copy, stats)
  for path, x in bn_inputs.items():
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    old, out = at_path(stats, path), at_path(new, path)
    out["mean"] = 0.9 * old["mean"] + 0.1 * x.mean(0)
    out["var"] = 0.9 * old["var"] + 0.1 * x.var(0, ddof=1)
  return new


def grad_from_first_sgd_step(new, old, *, lr, momentum, weight_decay):
  """The gradient a first step of torch's SGD (coupled weight decay, Nesterov, buffers 0) took:
  its buf is d = g + wd p, so p_new = p - lr (1 + momentum) d and
  g = (p - p_new) / (lr (1 + momentum)) - wd p, leaf by leaf in float64."""
  return jax.tree_util.tree_map(
      lambda n, o: (np.float64(o) - np.float64(n)) / (lr * (1 + momentum))
      - weight_decay * np.float64(o), new, old)


# ------------------------------------------------------------------------------------------------
# the network's forward (the one thing a reference shares with the code under test)

def train_forward(model, params, stats, x):
  """The train-mode forward with plain BN over all of x (bn_groups=1: one GPU of the authors'):
  (features, logits, new batch_stats)."""
  (feat, logits), new = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                                    bn_groups=1, mutable=["batch_stats"])
  return feat, logits, new["batch_stats"]


train_forward_jit = jax.jit(train_forward, static_argnums=0)


def train_forward_with_bn_inputs(model, variables, x, rngs=None):
  """`train_forward` of `variables` that also returns every BN layer's input, captured by
  interception: ((features, logits), {BN layer path: its input}), from which a reference computes
  the running statistics itself."""
  inputs = {}

  def capture(next_fun, args, kwargs, context):
    if isinstance(context.module, GroupedBatchNorm) and context.method_name == "__call__":
      inputs[tuple(context.module.path)] = args[0]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(capture):
    out, _ = model.apply(variables, x, train=True, bn_groups=1, mutable=["batch_stats"],
                         rngs=rngs)
  return out, inputs


# ------------------------------------------------------------------------------------------------
# comparing a port's steps with a reference's

def assert_updates_close(new, old, want_new, want_old, what, rtol=1e-3):
  """Each parameter's update new - old against the wanted one want_new - want_old, leaf by leaf:
  float32 rounding of the stored parameter (a few ulps of its largest entry) on top of the usual
  tolerance (an update is a small difference of large numbers: comparing the parameters
  themselves would hide a wrong update under their size)."""
  def check(path, n, o, wn, wo):
    got = np.float64(n) - np.float64(o)
    want = np.float64(wn) - np.float64(wo)
    ulp = float(np.spacing(np.float32(np.max(np.abs(o), initial=0.0))))
    tol = max(8 * ulp, 1e-4 * float(np.max(np.abs(want), initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=tol,
                               err_msg=f"{what}{jax.tree_util.keystr(path)}")
  jax.tree_util.tree_map_with_path(check, new, old, want_new, want_old)


def run_two_bank_steps(config, model, rs, ref_step, *, num_images, size):
  """Two steps of an NRC/AaD-style method (one 'image' view, a feature/score bank) through the
  port's built step and through `ref_step(model, ref, batch, config) -> (ref, info)`, from random
  variables and `random_banks`. `ref` holds float64 numpy trees: it, params, buf (torch's
  momentum), stats, fea_bank, score_bank. The reference's step 2 starts from the port's step-1
  network (its own banks and momentum): float32 rounding of step 1, amplified by the ResNet's
  batch norms over 8 rows, would otherwise blur the comparison of step 2 by more than the
  tolerances. Returns a namespace: built, states (0, 1, 2: host copies), metrics (1, 2), refs
  (0, 1, 2), infos (1, 2), from1 (the reference's start of step 2)."""
  m = config.model
  b = config.batch_size
  variables = random_variables(model, rs, size)
  mesh = parallel.create_mesh(jax.devices()[:1])
  built = train_adapt.build(config, mesh, variables, num_images)
  banks = random_banks(rs, num_images, m.feat_dim, m.num_classes)
  state = jax.device_put(built.state.replace(banks=banks), built.shardings)
  state0 = jax.device_get(state)
  perm = rs.permutation(num_images)
  batches = [image_batch(rs, perm[:b], size, m.num_classes),
             image_batch(rs, perm[b:2 * b], size, m.num_classes)]

  params0 = float64_tree(state0.params)
  ref0 = dict(it=0, params=params0, buf=jax.tree_util.tree_map(np.zeros_like, params0),
              stats=float64_tree(state0.batch_stats),
              fea_bank=np.array(state0.banks.feat, np.float64),
              score_bank=np.array(state0.banks.score, np.float64))
  out, m1 = built.step(state, parallel.shard_batch(batches[0], mesh))
  state1 = jax.device_get(out)              # a host copy: the next call donates `out`
  state2, m2 = jax.device_get(built.step(out, parallel.shard_batch(batches[1], mesh)))

  ref1, info1 = ref_step(model, ref0, batches[0], config)
  from1 = dict(ref1, params=float64_tree(state1.params),
               stats=float64_tree(state1.batch_stats))
  ref2, info2 = ref_step(model, from1, batches[1], config)
  return types.SimpleNamespace(built=built, states=(state0, state1, state2), metrics=(m1, m2),
                               refs=(ref0, ref1, ref2), infos=(info1, info2), from1=from1)


def bank_forward_and_write(model, ref, batch, config):
  """The start of an NRC/AaD iteration of the authors' loop, on a `run_two_bank_steps` ref: the
  train-mode forward of the batch, then its rows of both banks written (on copies) before any
  neighbour query. A namespace: x (the network input), params32, stats32 (the float32 network),
  p (softmax, float64), fn (L2-normalised features), new_stats (float64), fea_bank, score_bank."""
  x = normalize_images(batch["image"], config)
  params32, stats32 = float32_tree(ref["params"]), float32_tree(ref["stats"])
  feat, logits, new_stats = train_forward_jit(model, params32, stats32, x)
  p = softmax(logits)
  fn = l2_normalize(np.asarray(feat, np.float64))
  idx = batch["index"]
  fea_bank, score_bank = ref["fea_bank"].copy(), ref["score_bank"].copy()
  fea_bank[idx], score_bank[idx] = fn, p                   # written before the query
  return types.SimpleNamespace(x=x, params32=params32, stats32=stats32, p=p, fn=fn,
                               new_stats=float64_tree(new_stats), fea_bank=fea_bank,
                               score_bank=score_bank)


def next_bank_ref(ref, fwd, grad, lr):
  """The `run_two_bank_steps` ref after an NRC/AaD iteration: torch's SGD with the authors'
  groups (NRC_AAD_AUTHORS_SGD) applies `grad` (float64) at `lr`; the BN statistics and banks
  are `bank_forward_and_write`'s."""
  params, buf = torch_sgd(ref["params"], grad, ref["buf"], lr=lr, optim=NRC_AAD_AUTHORS_SGD,
                          group_of=eercl.PARAM_GROUPS)
  return dict(it=ref["it"] + 1, params=params, buf=buf, stats=fwd.new_stats,
              fea_bank=fwd.fea_bank, score_bank=fwd.score_bank)


def assert_bank_steps_match(run, metric_wants):
  """`run_two_bank_steps`'s port against its reference, each step: the metrics
  (`metric_wants(info)` -> [(key, wanted value)]), both banks, the BN statistics, the step
  counter, and every parameter's update (`assert_updates_close`)."""
  state0, state1, state2 = run.states
  ref0, ref1, ref2 = run.refs
  for what, (got, m, ref, info) in {
      "step 1 ": (state1, run.metrics[0], ref1, run.infos[0]),
      "step 2 ": (state2, run.metrics[1], ref2, run.infos[1])}.items():
    for key, want in metric_wants(info):
      assert float(m[key]) == pytest.approx(want, rel=1e-5, abs=1e-6), what + key
    assert_trees_close(got.banks.feat, ref["fea_bank"], what=what + "feature bank ")
    assert_trees_close(got.banks.score, ref["score_bank"], what=what + "score bank ")
    assert_trees_close(got.batch_stats, ref["stats"], what=what + "batch_stats ")
    assert int(got.step) == ref["it"]
  assert_updates_close(state1.params, state0.params, ref1["params"], ref0["params"],
                       "step 1 update ")
  assert_updates_close(state2.params, state1.params, ref2["params"], run.from1["params"],
                       "step 2 update ")


def assert_bank_fill_is_an_eval_pass_over_the_weak_view(method):
  """The demo dry run's bank refresh for `method` (an NRC/AaD-style feature/score bank; the
  working directory holds the dry run's data) before the first step writes every target
  image's row once: the L2-normalised features and the softmax of an eval-mode forward (BN
  running statistics) of the weak view (the authors' training loader), nothing else of the state
  changing."""
  config = demo_adapt.get_config("runlocal")
  adapt_family.baseline(config, method)
  target_list, _ = run_lists.read_run_lists(config.data)
  model = eercl.create_model(config.model)
  variables = random_variables(model, np.random.RandomState(0), config.data.crop)
  mesh = parallel.create_mesh(jax.devices()[:1])
  built = train_adapt.build(config, mesh, variables, len(target_list))
  state, _ = built.refresh(built.state, target_list, 0, with_teacher=False)
  state = jax.device_get(state)

  want_feat = np.full((len(target_list), config.model.feat_dim), np.nan)
  want_score = np.full((len(target_list), config.model.num_classes), np.nan)
  views = {}
  for view in ("weak", "test"):
    for host in built.evaluator.loader.eval(target_list, view, config.adapt.refresh_batch_size,
                                            seed=config.seed, epoch=0):
      valid = host["valid"]
      rows = host["index"][valid]
      views.setdefault(view, {}).update(zip(rows, host["image"][valid]))
      if view == "weak":
        feat, logits = model.apply(variables, normalize_images(host["image"], config),
                                   train=False)
        assert np.all(np.isnan(want_feat[rows])), "a row written twice"
        want_feat[rows] = l2_normalize(np.asarray(feat, np.float64))[valid]
        want_score[rows] = softmax(logits)[valid]
  assert not np.isnan(want_feat).any(), "a row never written"
  # the weak view is a random crop/flip, not the test view
  assert any(np.any(views["weak"][i] != views["test"][i]) for i in views["test"])
  assert_trees_close(state.banks.feat, want_feat, what="feature bank ")
  assert_trees_close(state.banks.score, want_score, what="score bank ")
  jax.tree_util.tree_map(np.testing.assert_array_equal, state.params, variables["params"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, state.batch_stats,
                         variables["batch_stats"])
  assert int(state.step) == 0
