"""AaD (methods/aad.py) against an independent restatement of its authors' code: two whole steps
of the port, the bank-filling pass before them, and EERCL's AaD term as the same objective.

The reference restates Albert0147/AaD_SFDA `tar_adaptation.py` (`train_target`: alpha from the
iteration count before its increment, the lr from the count after it, bank update before the
query, top K+1 with the first dropped, the attract term through `F.kl_div` given probabilities,
the disperse term with both factors carrying gradient, SGD through `lr_scheduler`) in float64
numpy. It shares nothing with the code under test but the network's forward (`model.apply`,
train mode, BN over the whole batch as on the authors' single GPU): the gradient of the
restated loss through that forward comes from `jax.grad`, and torch's SGD (conftest.torch_sgd)
applies it with the authors' schedule lr0 (1 + 10 it / T)^-0.75, `it` counted from 1, and their
groups (backbone 0.1x, everything else, the classifier included, 1x).
"""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import adapt as adapt_family
from configs import demo_adapt
from eercl_jax import losses, parallel, train_adapt
from eercl_jax.data import run_lists
from eercl_jax.methods import feature_banks
from eercl_jax.models import eercl
from tests.conftest import assert_trees_close as _close, random_variables, torch_sgd

B, N = 8, 24           # batch, target images (bank rows)
C, D = 7, 8            # classes, feature dim
K = 3                  # neighbours
T = 20                 # the run's length: alpha(1) = 1.5^-5 = 0.13, not alpha(0) = 1
SIZE = 16              # image side
LR0 = 0.2              # the recipe's 1e-3 raised so the updates stand far above float32 rounding
MARGIN = 1e-4          # the smallest similarity gap at a top-k cut the reference accepts
BETA = 5.0             # the authors' VisDA default
# The authors' optimiser (their lr_scheduler and param groups): SGD, Nesterov, momentum 0.9,
# coupled weight decay 1e-3; netF (our backbone) 0.1x, netB and netC (every head group) 1x.
AUTHORS_SGD = types.SimpleNamespace(
    momentum=0.9, weight_decay=1e-3,
    lr_mult={"backbone": 0.1, "bottleneck": 1.0, "mlp": 1.0, "sfda": 1.0, "classifier": 1.0})


def _small_model(m, backbone):
  m.backbone = backbone
  m.feat_dim, m.num_classes, m.dtype, m.dropout = D, C, "float32", 0.0
  m.size = "mu" if backbone == "resnet" else "mu/8"
  m.bottleneck_dim = m.width = 16


def _config(backbone):
  c = adapt_family.get_config(f"method=aad,backbone={backbone}")
  o = c.optim   # the recipe is the authors' (checked here, its lr then raised: LR0)
  assert (o.name, o.momentum, o.nesterov, o.weight_decay, o.lr) == ("sgd", 0.9, True, 1e-3, 1e-3)
  assert (o.schedule, o.gamma, o.power) == ("shot", 10.0, 0.75)
  assert c.bn_group_size == c.batch_size          # BN over the whole batch
  assert (c.aad.beta, c.aad.alpha) == (BETA, 1.0)
  o.lr = LR0
  _small_model(c.model, backbone)
  c.batch_size = c.bn_group_size = B
  c.num_steps = T
  c.aad.k = K
  return c


def _images(rs):
  return rs.randint(0, 256, (B, SIZE, SIZE, 3)).astype(np.uint8)


def _batch(rs, indices):
  return dict(image=_images(rs), index=np.asarray(indices, np.int32),   # image: the weak view
              label=rs.randint(0, C, B).astype(np.int32))


# ------------------------------------------------------------------------------------------------
# the reference: the authors' train_target, one iteration

def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _l2n(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)   # F.normalize


def _xlogy(x):
  return np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), 0.0)


def _np(tree):
  return jax.tree_util.tree_map(lambda x: np.array(x, np.float64), tree)


def _f32(tree):
  return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _normalize(images, config):
  mean = np.asarray(config.data.mean, np.float32)
  std = np.asarray(config.data.std, np.float32)
  return (images.astype(np.float32) - mean) / std


def _forward_fn(model, params, stats, x):
  """The train-mode forward of the authors' iteration: BN over the whole batch."""
  (feat, logits), new = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                                    bn_groups=1, mutable=["batch_stats"])
  return feat, logits, new["batch_stats"]


_forward = jax.jit(_forward_fn, static_argnums=0)


def _neighbours(query, fea_bank, k):
  """torch.topk(query @ fea_bank.T, k + 1)[:, 1:], checking that no cut is a near-tie."""
  sims = query @ fea_bank.T
  order = np.argsort(-sims, axis=-1, kind="stable")
  ranked = np.take_along_axis(sims, order, -1)
  assert np.all(ranked[:, 0] - ranked[:, 1] > MARGIN), "self is not a clear top-1"
  assert np.all(ranked[:, k] - ranked[:, k + 1] > MARGIN), "a near-tie at the top-k cut"
  return order[:, 1:k + 1]


def _aad_terms(p, score_near):
  """(attract, disperse) as the authors: mean_i sum_k F.kl_div(p, s).sum(-1) (p probabilities:
  sum_c s log s - s p) and mean_i sum_{j != i} p_i . p_j."""
  attract = np.mean((_xlogy(score_near) - score_near * p[:, None, :]).sum(-1).sum(1))
  mask = 1.0 - np.eye(len(p))
  disperse = np.mean(((p @ p.T) * mask).sum(-1))
  return attract, disperse


def _loss_for_grad(model, params, stats, x, score_near, alpha):
  """The same loss in jnp for the gradient (the s log s constant dropped: no gradient); the
  disperse term's second factor `copy = softmax_out.T` is not detached (theirs neither)."""
  p = jax.nn.softmax(_forward_fn(model, params, stats, x)[1])
  attract = jnp.mean(jnp.sum(-jnp.sum(score_near * p[:, None, :], -1), 1))
  mask = 1.0 - jnp.eye(p.shape[0])
  disperse = jnp.mean(jnp.sum((p @ p.T) * mask, -1))
  return attract + alpha * disperse


_grad = jax.jit(jax.grad(_loss_for_grad, argnums=1), static_argnums=0)


def _ref_step(model, ref, batch, config):
  """One iteration of the authors' loop; `ref` holds float64 numpy trees and banks."""
  alpha = (1 + 10 * ref["it"] / T) ** (-BETA) * 1.0       # before iter_num += 1
  it = ref["it"] + 1
  lr = config.optim.lr * (1 + 10 * it / T) ** -0.75        # after it
  x = _normalize(batch["image"], config)
  feat, logits, new_stats = _forward(model, _f32(ref["params"]), _f32(ref["stats"]), x)
  p = _softmax(np.asarray(logits, np.float64))
  fn = _l2n(np.asarray(feat, np.float64))
  idx = batch["index"]
  fea_bank, score_bank = ref["fea_bank"].copy(), ref["score_bank"].copy()
  fea_bank[idx], score_bank[idx] = fn, p                   # written before the query
  score_near = score_bank[_neighbours(fn, fea_bank, K)]
  attract, disperse = _aad_terms(p, score_near)
  grad = _np(_grad(model, _f32(ref["params"]), _f32(ref["stats"]), x, _f32(score_near),
                   np.float32(alpha)))
  params, buf = torch_sgd(ref["params"], grad, ref["buf"], lr=lr, optim=AUTHORS_SGD,
                          group_of=eercl.PARAM_GROUPS)
  new = dict(it=it, params=params, buf=buf, stats=_np(new_stats), fea_bank=fea_bank,
             score_bank=score_bank)
  info = dict(loss=attract + alpha * disperse, attract=attract, disperse=disperse, alpha=alpha)
  return new, info


# ------------------------------------------------------------------------------------------------
# the tests

def _bank_contents(rs):
  """Known banks: random unit features and softmax scores (the batches' rows are overwritten)."""
  return feature_banks.Banks(feat=jnp.asarray(_l2n(rs.randn(N, D)), jnp.float32),
                             score=jnp.asarray(_softmax(2 * rs.randn(N, C)), jnp.float32))


def _check_update(new, old, want_new, want_old, what, rtol=1e-3):
  """Each parameter's update new - old against the wanted one, leaf by leaf: float32 rounding
  of the stored parameter (a few ulps of its largest entry) on top of the usual tolerance."""
  def check(path, n, o, wn, wo):
    got = np.float64(n) - np.float64(o)
    want = np.float64(wn) - np.float64(wo)
    ulp = float(np.spacing(np.float32(np.max(np.abs(o), initial=0.0))))
    tol = max(8 * ulp, 1e-4 * float(np.max(np.abs(want), initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=tol,
                               err_msg=f"{what}{jax.tree_util.keystr(path)}")
  jax.tree_util.tree_map_with_path(check, new, old, want_new, want_old)


# The ViT steps are in the fast tier; the ResNet's (BN inside the backbone too) are slower.
@pytest.mark.parametrize("backbone", [pytest.param("resnet", marks=pytest.mark.slow), "vit"])
def test_two_aad_steps_match_the_authors(backbone):
  config = _config(backbone)
  model = eercl.create_model(config.model)
  rs = np.random.RandomState(3)
  variables = random_variables(model, rs, SIZE)
  mesh = parallel.create_mesh(jax.devices()[:1])
  built = train_adapt.build(config, mesh, variables, N)
  assert built.method.frozen_groups() == ()                # the classifier is trained
  state = jax.device_put(built.state.replace(banks=_bank_contents(rs)), built.shardings)
  state0 = jax.device_get(state)
  perm = rs.permutation(N)
  batches = [_batch(rs, perm[:B]), _batch(rs, perm[B:2 * B])]

  params0 = _np(state0.params)
  ref0 = dict(it=0, params=params0, buf=jax.tree_util.tree_map(np.zeros_like, params0),
              stats=_np(state0.batch_stats), fea_bank=np.array(state0.banks.feat, np.float64),
              score_bank=np.array(state0.banks.score, np.float64))
  out, m1 = built.step(state, parallel.shard_batch(batches[0], mesh))
  state1 = jax.device_get(out)              # a host copy: the next call donates `out`
  state2, m2 = jax.device_get(built.step(out, parallel.shard_batch(batches[1], mesh)))

  ref1, info1 = _ref_step(model, ref0, batches[0], config)
  # The reference's step 2 starts from the port's step-1 network (its own banks and momentum):
  # float32 rounding of step 1, amplified by the ResNet's batch norms over 8 rows, would
  # otherwise blur the comparison of step 2 by more than the tolerances.
  from1 = dict(ref1, params=_np(state1.params), stats=_np(state1.batch_stats))
  ref2, info2 = _ref_step(model, from1, batches[1], config)
  assert info1["alpha"] == 1.0 and info2["alpha"] == pytest.approx(1.5 ** -5)

  for what, (got, m, ref, info) in {"step 1 ": (state1, m1, ref1, info1),
                                    "step 2 ": (state2, m2, ref2, info2)}.items():
    for key, want in (("train/loss", info["loss"]), ("train/aad_attract", info["attract"]),
                      ("train/aad_disperse", info["disperse"]), ("train/alpha", info["alpha"])):
      assert float(m[key]) == pytest.approx(want, rel=1e-5, abs=1e-6), what + key
    _close(got.banks.feat, ref["fea_bank"], what=what + "feature bank ")
    _close(got.banks.score, ref["score_bank"], what=what + "score bank ")
    _close(got.batch_stats, ref["stats"], what=what + "batch_stats ")
    assert int(got.step) == ref["it"]
  _check_update(state1.params, state0.params, ref1["params"], ref0["params"], "step 1 update ")
  _check_update(state2.params, state1.params, ref2["params"], from1["params"], "step 2 update ")


def test_bank_fill_is_an_eval_pass_over_the_weak_view(data_dir, monkeypatch):
  """The refresh before the first step writes every target image's row once: the L2-normalised
  features and the softmax of an eval-mode forward (BN running statistics) of the weak view (the
  authors' training loader), nothing else of the state changing."""
  monkeypatch.chdir(data_dir)
  config = demo_adapt.get_config("runlocal")
  adapt_family.baseline(config, "aad")
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
        feat, logits = model.apply(variables, _normalize(host["image"], config), train=False)
        assert np.all(np.isnan(want_feat[rows])), "a row written twice"
        want_feat[rows] = _l2n(np.asarray(feat, np.float64))[valid]
        want_score[rows] = _softmax(np.asarray(logits, np.float64))[valid]
  assert not np.isnan(want_feat).any(), "a row never written"
  # the weak view is a random crop/flip, not the test view
  assert any(np.any(views["weak"][i] != views["test"][i]) for i in views["test"])
  _close(state.banks.feat, want_feat, what="feature bank ")
  _close(state.banks.score, want_score, what="score bank ")
  jax.tree_util.tree_map(np.testing.assert_array_equal, state.params, variables["params"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, state.batch_stats,
                         variables["batch_stats"])
  assert int(state.step) == 0


# ------------------------------------------------------------------------------------------------
# EERCL's AaD term is this objective

W, AAD_WEIGHT = 2, 0.7     # EERCL's virtual devices and AaD weight
STEP = 5                   # a step index where the dispersion weight is not 1


def test_eercl_without_relation_terms_is_aad_scaled_by_its_weight_over_w(monkeypatch):
  """EERCL with `class_contrast_weight = instance_nce_weight = 0` optimises the AaD objective
  scaled by aad_weight / W: its loss is aad_weight x (attract + decay x disperse) / W and its
  gradient aad_weight / W x the AaD method's.

  The two methods differ by design in what they feed the objective: EERCL queries its teacher's
  bank with the teacher's weak features and predicts on three views in BN groups, AaD queries
  its own bank with the online weak features of a one-view forward. The demonstration removes
  exactly those differences, and nothing else: every view is the weak image and the BN group is
  the whole batch (BN over [w; w; w] has the mean and the biased variance of BN over w, as a
  function of the parameters, so the online weak predictions and their gradients are the
  one-view forward's), the teacher equals the online network (its EMA then a no-op, shuffle-BN
  a permutation inside one group), dropout is off, and both banks hold the same rows. The
  dispersion weight of both is taken at the same 0-based step (5 of 20: 2.5^-beta, not 1).
  Then:
    * both steps call `losses.aad_loss` once, on (B, C) predictions and (B, K, C) neighbours:
      the one function for the objective;
    * the AaD terms they report are equal, and EERCL's loss is aad_weight / W x AaD's - which is
      also the restated formula on EERCL's own (teacher) bank after the step;
    * with plain SGD (no momentum, no decay, constant lr) each parameter's EERCL update is
      aad_weight / W x AaD's: the gradients, classifier included (unfrozen here);
    * the banks' written rows and the BN batch statistics agree.
  """
  calls = []
  real = losses.aad_loss

  def spy(probs, neighbour_probs):
    calls.append((probs.shape, neighbour_probs.shape))
    return real(probs, neighbour_probs)
  monkeypatch.setattr(losses, "aad_loss", spy)

  def common(c):
    _small_model(c.model, "vit")
    c.batch_size = c.bn_group_size = B
    c.num_steps = T
    o = c.optim
    o.name, o.lr, o.momentum, o.weight_decay, o.schedule = "sgd", 0.5, 0.0, 0.0, "constant"
    o.lr_mult = {g: 1.0 for g in o.lr_mult}
    return c

  ce = common(demo_adapt.get_config())
  a = ce.adapt
  a.class_contrast_weight = a.instance_nce_weight = 0.0
  a.aad_weight, a.aad_neighbours, a.aad_decay_power = AAD_WEIGHT, K, BETA
  a.fix_classifier, a.shard_banks = False, False
  ce.virtual_devices = W
  ca = common(adapt_family.baseline(demo_adapt.get_config(), "aad"))
  ca.aad.k, ca.aad.beta, ca.aad.alpha = K, BETA, 1.0

  model = eercl.create_model(ce.model)
  rs = np.random.RandomState(5)
  variables = jax.device_get(random_variables(model, rs, SIZE))   # host copies: steps donate
  bank = jax.device_get(_bank_contents(rs))
  mesh = parallel.create_mesh(jax.devices()[:1])
  weak, idx = _images(rs), rs.permutation(N)[:B].astype(np.int32)
  label = np.zeros(B, np.int32)

  out = {}
  for name, c, batch in (
      ("eercl", ce, dict(weak=weak, strong1=weak, strong2=weak, index=idx, label=label)),
      ("aad", ca, dict(image=weak, index=idx, label=label))):
    built = train_adapt.build(c, mesh, _f32(variables), N)
    banks = built.state.banks
    banks = (banks.replace(aad_feat=jnp.asarray(bank.feat), aad_score=jnp.asarray(bank.score))
             if name == "eercl" else _f32(bank))
    state = built.state.replace(step=jnp.asarray(STEP, jnp.int32), banks=banks)
    state = jax.device_put(state, built.shardings)
    before = len(calls)
    new, metrics = jax.device_get(built.step(state, parallel.shard_batch(batch, mesh)))
    assert calls[before:] == [((B, C), (B, K, C))], name
    out[name] = (new, metrics)
  (e, me), (s, ma) = out["eercl"], out["aad"]

  decay = (1 + 10 * STEP / T) ** -BETA
  assert float(ma["train/alpha"]) == pytest.approx(decay, rel=1e-6)
  for key in ("train/aad_attract", "train/aad_disperse"):
    assert float(me[key]) == pytest.approx(float(ma[key]), rel=1e-5), key
  assert float(me["train/loss"]) == pytest.approx(AAD_WEIGHT / W * float(ma["train/loss"]),
                                                  rel=1e-5)
  # The restated objective on EERCL's own bank after the step (its teacher's rows written, the
  # query being those rows) with the one-view predictions of the source parameters.
  feat_bank, score_bank = np.float64(e.banks.aad_feat), np.float64(e.banks.aad_score)
  x = _normalize(weak, ce)
  p = _softmax(np.float64(_forward(model, variables["params"], variables["batch_stats"], x)[1]))
  attract, disperse = _aad_terms(p, score_bank[_neighbours(feat_bank[idx], feat_bank, K)])
  assert float(me["train/loss"]) == pytest.approx(
      AAD_WEIGHT * (attract + decay * disperse) / W, rel=1e-5)
  # Gradients: each update is -lr x gradient.
  scaled = jax.tree_util.tree_map(lambda n, o: o + AAD_WEIGHT / W * (n - o), _np(s.params),
                                  _np(variables["params"]))
  _check_update(e.params, variables["params"], scaled, _np(variables["params"]),
                "EERCL update vs aad_weight / W x AaD's ")
  _close(e.banks.aad_feat, s.banks.feat, what="feature bank ")
  _close(e.banks.aad_score, s.banks.score, what="score bank ")
  # BN: the same batch mean and biased variance (the running var takes the unbiased one, over
  # 3B rows for EERCL, B for AaD: the Bessel factors differ; PyTorch's momentum 0.1).
  def batch_var(new_var, old_var, rows):
    return (np.float64(new_var) - 0.9 * np.float64(old_var)) / 0.1 * (rows - 1) / rows
  old = variables["batch_stats"]
  for scope in old:
    _close(e.batch_stats[scope]["mean"], s.batch_stats[scope]["mean"], what=f"{scope} mean ")
    _close(batch_var(e.batch_stats[scope]["var"], old[scope]["var"], 3 * B),
           batch_var(s.batch_stats[scope]["var"], old[scope]["var"], B), what=f"{scope} var ")
