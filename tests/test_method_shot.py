"""SHOT of the port (`config.method = 'shot'` with the `method=shot` recipe of configs/adapt.py)
against a restatement of the authors' `object/image_target.py` (tim-learn/SHOT @ f7d555a).

The authors' iteration (`train_target`, L164-227): `iter_num += 1`, the learning rate set by
`lr_scheduler` from the incremented counter (lr0 (1 + 10 iter_num / max_iter)^-0.75, the first
step counting 1, L23-30), one train-mode forward of the training batch, loss =
0.3 CE(z, pseudo-label) + (mean_i -sum_c p log(p + 1e-5) - [-sum_c m log(m + 1e-5)]) with m the
batch's mean prediction (L190-207, `loss.Entropy`), and `torch.optim.SGD` re-set by the
scheduler to momentum 0.9, Nesterov, coupled weight decay 1e-3 on every trained tensor; the
backbone (netF) at lr x 0.1, the bottleneck (netB: Linear + BN) at lr x 1, the classifier
(netC) frozen (L141-157). Its pseudo-labels (`obtain_label`, L242-297): an eval-mode pass over
the target list, a column of ones appended to the features, rows L2-normalised, two rounds of
weighted k-means in cosine distance (soft weights, then one-hot), the labelset (classes with more
than `threshold` = 0 members) recomputed in each round from the current labels.

The reference shares only the network's forward (`model.apply`: train mode with one BN group,
the authors' single GPU, or eval mode) and its input normalisation. Restated here: the loss,
which parameter groups train at which rate, torch's SGD and the schedule (`tests/conftest.py
torch_sgd` with the authors' groups), the BN running statistics from each BN layer's input
(captured by interception; PyTorch: 0.9 running + 0.1 (mean, unbiased variance)), and
`obtain_label` in float64 numpy. This project's head stack stands for netB: every parameter
between the backbone and the classifier (docs/deviations.md#shot).
"""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import adapt as adapt_configs
from configs import demo_adapt
from eercl_jax import parallel, train_adapt
from eercl_jax.data import lists
from tests import method_reference as ref_lib
from tests.conftest import assert_trees_close, random_variables, torch_sgd

B = 8                  # images per step: one BN group, as the authors' single GPU
N = 40                 # target images
C, D = 7, 8            # classes, feature dim
SIZE = 16              # image side
T = 6                  # the run's length (the authors' max_iter)
# The authors' settings (argparse L300-331, lr_scheduler L23-30).
LR, MOMENTUM, WD, GAMMA, POWER = 1e-2, 0.9, 1e-3, 10.0, 0.75
CLS_PAR, ENT_PAR, EPSILON = 0.3, 1.0, 1e-5
# netF: the backbone; netB: everything between it and the classifier; netC: the classifier.
NET = {"backbone": "netF", "bottleneck": "netB", "bottleneck_bn": "netB", "mlp": "netB",
       "sfda_bottleneck": "netB", "sfda_bn": "netB", "classifier": "netC"}
SGD = types.SimpleNamespace(lr_mult={"netF": 0.1, "netB": 1.0}, weight_decay=WD,
                            momentum=MOMENTUM)


def _model(backbone):
  return ref_lib.tiny_model(backbone, feat_dim=D, num_classes=C)


def _config(backbone):
  c = demo_adapt.get_config()
  ref_lib.set_tiny_model(c.model, backbone, feat_dim=D, num_classes=C)
  c.batch_size, c.num_steps = B, T
  c.data.resize = c.data.crop = SIZE         # the test view is then the image itself
  c.adapt.refresh_batch_size = 16            # N = 40: the pass's last batch is padded
  adapt_configs.baseline(c, "shot")          # the authors' optimiser, BN over the whole batch
  assert c.bn_group_size == B
  return c


# ------------------------------------------------------------------------------------------------
# the step

def _loss(model, params, batch_stats, x, labels):
  """The authors' loss on one train-mode forward, and every BN layer's input ({path: x})."""
  (_, logits), inputs = ref_lib.train_forward_with_bn_inputs(
      model, {"params": params, "batch_stats": batch_stats}, x)
  p = jax.nn.softmax(logits, 1)
  ce = jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits, 1), labels[:, None], 1))
  ent = jnp.mean(-jnp.sum(p * jnp.log(p + 1e-5), 1))             # loss.Entropy, eps hard-coded
  m = jnp.mean(p, 0)
  gent = jnp.sum(-m * jnp.log(m + EPSILON))
  return CLS_PAR * ce + (ent - gent) * ENT_PAR, inputs


_ref_grad = jax.jit(jax.value_and_grad(_loss, argnums=1, has_aux=True), static_argnums=0)


def _ref_step(model, ref, batch, pseudo_labels, config):
  """One iteration of the authors' train_target; `ref` holds float64 trees and torch's buffers."""
  it = ref["it"] + 1                                              # iter_num += 1, then the lr
  lr = LR * (1 + GAMMA * it / T) ** -POWER
  (loss, bn_inputs), grad = _ref_grad(
      model, ref_lib.float32_tree(ref["params"]), ref_lib.float32_tree(ref["stats"]),
      jnp.asarray(ref_lib.normalize_images(batch["image"], config)),
      jnp.asarray(pseudo_labels[batch["index"]]))
  grad = ref_lib.float64_tree(grad)
  params, buf = torch_sgd(ref["params"], grad, ref["buf"], lr=lr, optim=SGD, group_of=NET,
                          frozen=("netC",))
  new = dict(it=it, params=params, buf=buf,
             stats=ref_lib.torch_bn_running_stats(ref["stats"], jax.device_get(bn_inputs)))
  return new, types.SimpleNamespace(loss=float(loss), grad=grad, lr=lr)


def _assert_update(name, new, old, want_new):
  """The port's update of one tensor against the reference's, to float32 resolution of the
  parameter (a step moves a parameter by ~1e-5 of its size: half an ulp of a float32 is 3e-8)."""
  new, old, want_new = (np.asarray(a, np.float64) for a in (new, old, want_new))
  got, want = new - old, want_new - old
  tol = 1e-3 * np.abs(want) + 2.0 ** -22 * (np.abs(old) + np.abs(new)) + 1e-12
  bad = np.abs(got - want) > tol
  assert not bad.any(), (f"update of {name}: {bad.sum()} of {bad.size} entries differ, e.g. "
                         f"got {got[bad][:4]} want {want[bad][:4]}")


@pytest.mark.parametrize("backbone", [pytest.param("resnet", marks=pytest.mark.slow), "vit"])
def test_two_shot_steps_match_the_authors(backbone):
  config = _config(backbone)
  model = _model(backbone)
  rs = np.random.RandomState(5)
  variables = random_variables(model, rs, SIZE)
  mesh = parallel.create_mesh(jax.devices()[:1])
  built = train_adapt.build(config, mesh, variables, N)
  assert built.method.views == ("weak",)      # the authors' training transform (random crop+flip)
  pseudo = rs.randint(0, C, N).astype(np.int32)
  state = jax.device_put(built.state.replace(banks=built.state.banks.replace(
      labels=jnp.asarray(pseudo))), built.shardings)
  state0 = jax.device_get(state)

  perm = rs.permutation(N)
  batches = [ref_lib.image_batch(rs, perm[i * B:(i + 1) * B], SIZE, C) for i in range(2)]
  out, m1 = built.step(state, parallel.shard_batch(batches[0], mesh))
  state1 = jax.device_get(out)
  state2, m2 = jax.device_get(built.step(out, parallel.shard_batch(batches[1], mesh)))

  src = ref_lib.float64_tree(state0.params)
  ref1, info1 = _ref_step(model, dict(it=0, params=src,
                                      stats=ref_lib.float64_tree(state0.batch_stats),
                                      buf=jax.tree_util.tree_map(np.zeros_like, src)),
                          batches[0], pseudo, config)
  # Step 2 of the reference continues from the port's state after step 1 (checked below against
  # the reference's step 1) with the reference's momentum buffers.
  ref2, info2 = _ref_step(model, dict(ref1, params=ref_lib.float64_tree(state1.params),
                                      stats=ref_lib.float64_tree(state1.batch_stats)),
                          batches[1], pseudo, config)

  assert float(m1["train/loss"]) == pytest.approx(info1.loss, rel=1e-5)
  assert float(m2["train/loss"]) == pytest.approx(info2.loss, rel=1e-5)
  np.testing.assert_array_equal(state2.banks.labels, pseudo)        # a step keeps the labels

  # Step 1 from the source model: torch's first step sets buf = d, so the update is
  # -lr_g (1 + momentum) (g + wd p): the gradient of every trained parameter, recovered.
  for scope in src:
    if NET[scope] == "netC":                # frozen: bit-identical after both steps
      for got in (state1, state2):
        jax.tree_util.tree_map(np.testing.assert_array_equal, got.params[scope],
                               state0.params[scope])
      continue
    lr = info1.lr * SGD.lr_mult[NET[scope]]
    got_grad = ref_lib.grad_from_first_sgd_step(state1.params[scope], state0.params[scope],
                                                lr=lr, momentum=MOMENTUM, weight_decay=WD)
    for path, g in jax.tree_util.tree_leaves_with_path(got_grad):
      name = scope + jax.tree_util.keystr(path)
      want = ref_lib.at_path(info1.grad[scope], path)
      old = np.abs(np.float64(ref_lib.at_path(state0.params[scope], path)))
      # float32 resolution of the parameter, seen through the division by lr_g (1 + momentum)
      # and float32 sums in the gradient (a few ulps of the tensor's largest entries)
      tol = (3e-4 * np.abs(want) + 2.0 ** -22 * old / (lr * (1 + MOMENTUM))
             + 3e-5 * np.abs(want).max() + 1e-7)
      bad = np.abs(g - want) > tol
      assert not bad.any(), f"grad {name}: got {g[bad][:4]} want {want[bad][:4]}"
  for got, want, prev, t in ((state1, ref1, state0, 1), (state2, ref2, state1, 2)):
    for path, p in jax.tree_util.tree_leaves_with_path(got.params):
      _assert_update(f"step {t} {jax.tree_util.keystr(path)}", p,
                     ref_lib.at_path(prev.params, path), ref_lib.at_path(want["params"], path))
    assert_trees_close(got.batch_stats, want["stats"], what=f"step {t}: batch_stats ")


# ------------------------------------------------------------------------------------------------
# the pseudo-labels

def obtain_label(features, logits, threshold=0, ones=True, first_labelset=False):
  """The authors' obtain_label (cosine distance) in float64: (labels, each row's margin between
  its nearest and second-nearest centroid in the last round). The flags make two slips, to show
  that the test data tells them apart: `ones=False` leaves out the column of ones,
  `first_labelset=True` keeps round 1's labelset in round 2 (a class emptied by round 1 then has
  a zero centroid, taken at cosine 0)."""
  p = ref_lib.softmax(logits)
  predict = p.argmax(1)
  f = np.asarray(features, np.float64)
  if ones:
    f = np.concatenate([f, np.ones((len(f), 1))], 1)              # L270
  f = f / np.linalg.norm(f, axis=1, keepdims=True)                # L271
  aff = p
  k = p.shape[1]
  labelset = None
  for _ in range(2):                                              # L277
    initc = aff.T @ f / (1e-8 + aff.sum(0)[:, None])              # L278-279
    if labelset is None or not first_labelset:
      cls_count = np.eye(k)[predict].sum(0)                       # L280: the current labels
      labelset = np.where(cls_count > threshold)[0]               # L281-282
    cent = initc[labelset]
    norm = np.linalg.norm(cent, axis=1, keepdims=True)
    dd = 1 - f @ (cent / np.where(norm > 0, norm, 1)).T           # scipy 'cosine'
    predict = labelset[dd.argmin(1)]                              # L285-286
    aff = np.eye(k)[predict]                                      # L288
  two = np.sort(dd, 1)[:, :2]
  return predict, (two[:, 1] - two[:, 0]) if dd.shape[1] > 1 else np.full(len(f), np.inf)


def test_shot_obtain_label_recomputes_the_labelset():
  """`methods.shot.obtain_label` alone on clustered random features where round 1 empties a
  class that round 2 would otherwise still offer (found by search: about 1 draw in 100)."""
  from eercl_jax.methods import shot  # pylint: disable=import-outside-toplevel
  rs = np.random.RandomState(469)
  k, n = 4, 24
  centres = rs.randn(k, 3) * 3
  feats = centres[rs.randint(0, k, n)] + rs.randn(n, 3)
  logits = rs.randn(n, k) * 1.5
  want, margin = obtain_label(feats, logits)
  got = shot.obtain_label(jnp.asarray(feats, jnp.float32),
                          jax.nn.softmax(jnp.asarray(logits, jnp.float32), -1), threshold=0,
                          num_images=n)
  np.testing.assert_array_equal(np.asarray(got), want)
  assert margin.min() > 1e-4, margin.min()
  assert (obtain_label(feats, logits, first_labelset=True)[0] != want).any()


def _target_list(root, rs):
  """N tiny PNGs around a few base patterns (so the features cluster), and their list."""
  bases = rs.randint(0, 256, (4, SIZE, SIZE, 3))
  images = np.clip(bases[rs.randint(0, 4, N)] + rs.randint(-40, 41, (N, SIZE, SIZE, 3)), 0, 255)
  images = images.astype(np.uint8)
  ref_lib.write_target_list(root, images, rs, C)
  return images


_eval_forward = jax.jit(lambda model, v, x: model.apply(v, x, train=False), static_argnums=0)


def _calibrated(model, variables, x):
  """`variables` with every BN layer's running statistics set to the statistics of its input
  over `x` (a source model whose statistics fit the target, so its eval-mode features spread
  over the classes rather than sitting at one random offset)."""
  stats = jax.tree_util.tree_map(np.array, variables["batch_stats"])
  _, bn_inputs = jax.jit(_loss, static_argnums=0)(model, variables["params"],
                                                  variables["batch_stats"], x,
                                                  jnp.zeros((len(x),), jnp.int32))
  for path, h in jax.device_get(bn_inputs).items():
    h = np.asarray(h).reshape(-1, h.shape[-1])
    node = ref_lib.at_path(stats, path)
    node["mean"], node["var"] = h.mean(0), h.var(0)
  return dict(variables, batch_stats=ref_lib.float32_tree(stats))


@pytest.mark.parametrize("backbone", [pytest.param("resnet", marks=pytest.mark.slow), "vit"])
def test_shot_pseudo_labels_match_the_authors(backbone, tmp_path):
  config = _config(backbone)
  model = _model(backbone)
  rs = np.random.RandomState(19)
  images = _target_list(str(tmp_path), rs)
  target_list = lists.read_list(str(tmp_path / "list.txt"), str(tmp_path),
                                config.data.class_names)
  x = jnp.asarray(ref_lib.normalize_images(images, config))
  variables = _calibrated(model, random_variables(model, rs, SIZE), x)
  mesh = parallel.create_mesh(jax.devices()[:1])
  built = train_adapt.build(config, mesh, variables, N)
  state, _ = built.refresh(built.state, target_list, 0, with_teacher=False)
  got = np.asarray(jax.device_get(state.banks.labels))

  # The authors' pass: netF, netB in eval mode over the whole list, un-augmented.
  feats, logits = _eval_forward(model, variables, x)
  want, margin = obtain_label(feats, logits)
  np.testing.assert_array_equal(got, want)
  # The data makes the test sharp: no near-tie, the clustering moves labels away from the
  # argmax, and the column of ones changes some label.
  assert margin.min() > 1e-4, margin.min()
  assert len(set(want)) >= 3, want
  assert (want != np.asarray(logits).argmax(1)).any()
  assert (obtain_label(feats, logits, ones=False)[0] != want).any()


def test_shot_refresh_cadence():
  """The authors' interval_iter = max_iter // interval: pseudo-labels before iterations 0, I,
  2I, ... (before the increment), and never without the pseudo-label term (cls_par = 0)."""
  from eercl_jax import methods  # pylint: disable=import-outside-toplevel
  config = _config("vit")
  config.num_steps, config.shot.interval = 30, 15
  method = methods.create(config)
  assert [i for i in range(30) if method.refresh_due(i)] == list(range(0, 30, 2))
  config.shot.cls_par = 0.0
  assert not any(methods.create(config).refresh_due(i) for i in range(30))
