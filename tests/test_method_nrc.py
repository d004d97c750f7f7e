"""NRC (methods/nrc.py) against an independent restatement of its authors' code: two whole steps
of the port and the bank-filling pass before them.

The reference restates Albert0147/NRC_SFDA `train_tar.py` (`train_target`: bank update before
the query, top K+1 / KK+1 with the first dropped, reciprocal weights, `F.kl_div` given
probabilities, the diversity term, SGD through `lr_scheduler`) in float64 numpy, with the
reciprocal weight of its Office-Home script and paper (1 for a reciprocal neighbour, else 0.1;
docs/deviations.md#nrc). It shares nothing with the code under test but the network's forward
(`model.apply`, train mode, BN over the whole batch as on the authors' single GPU): the
gradient of the restated loss through that forward comes from `jax.grad`, and torch's SGD
(conftest.torch_sgd) applies it with the authors' schedule lr0 (1 + 10 it / T)^-0.75, `it`
counted from 1, and their groups (backbone 0.1x, everything else, the classifier included, 1x).
"""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import adapt as adapt_family
from configs import demo_adapt
from eercl_jax import parallel, train_adapt
from eercl_jax.data import run_lists
from eercl_jax.methods import feature_banks
from eercl_jax.models import eercl
from tests.conftest import assert_trees_close as _close, random_variables, torch_sgd

B, N = 8, 24           # batch, target images (bank rows)
C, D = 7, 8            # classes, feature dim
K, KK = 3, 3           # neighbours, expanded neighbours
T = 20                 # the run's length (the lr schedule)
SIZE = 16              # image side
LR0 = 0.2              # the recipe's 1e-3 raised so the updates stand far above float32 rounding
MARGIN = 1e-4          # the smallest similarity gap at a top-k cut the reference accepts
# The authors' optimiser (their lr_scheduler and param groups): SGD, Nesterov, momentum 0.9,
# coupled weight decay 1e-3; netF (our backbone) 0.1x, netB and netC (every head group) 1x.
AUTHORS_SGD = types.SimpleNamespace(
    momentum=0.9, weight_decay=1e-3,
    lr_mult={"backbone": 0.1, "bottleneck": 1.0, "mlp": 1.0, "sfda": 1.0, "classifier": 1.0})


def _config(backbone):
  c = adapt_family.get_config(f"method=nrc,backbone={backbone}")
  o = c.optim   # the recipe is the authors' (checked here, its lr then raised: LR0)
  assert (o.name, o.momentum, o.nesterov, o.weight_decay, o.lr) == ("sgd", 0.9, True, 1e-3, 1e-3)
  assert (o.schedule, o.gamma, o.power) == ("shot", 10.0, 0.75)
  assert c.bn_group_size == c.batch_size          # BN over the whole batch
  assert (c.nrc.affinity, c.nrc.expanded_weight, c.nrc.epsilon) == (0.1, 0.1, 1e-5)
  o.lr = LR0
  m = c.model
  m.feat_dim, m.num_classes, m.dtype, m.dropout = D, C, "float32", 0.0
  m.size = "mu" if backbone == "resnet" else "mu/8"
  m.bottleneck_dim = m.width = 16
  c.batch_size = c.bn_group_size = B
  c.num_steps = T
  c.nrc.k, c.nrc.kk = K, KK
  return c


def _batch(rs, indices):
  return dict(image=rs.randint(0, 256, (B, SIZE, SIZE, 3)).astype(np.uint8),   # the weak view
              index=np.asarray(indices, np.int32), label=rs.randint(0, C, B).astype(np.int32))


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


def _input(batch, config):
  mean = np.asarray(config.data.mean, np.float32)
  std = np.asarray(config.data.std, np.float32)
  return (batch["image"].astype(np.float32) - mean) / std


def _forward_fn(model, params, stats, x):
  """The train-mode forward of the authors' iteration: BN over the whole batch."""
  (feat, logits), new = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                                    bn_groups=1, mutable=["batch_stats"])
  return feat, logits, new["batch_stats"]


_forward = jax.jit(_forward_fn, static_argnums=0)


def _topk_after_first(sims, k):
  """torch.topk(sims, k + 1)[..., 1:], checking that no cut is a near-tie: rank 0 (self) clear
  of rank 1, rank k clear of rank k + 1."""
  order = np.argsort(-sims, axis=-1, kind="stable")
  ranked = np.take_along_axis(sims, order, -1)
  assert np.all(ranked[..., 0] - ranked[..., 1] > MARGIN), "self is not a clear top-1"
  assert np.all(ranked[..., k] - ranked[..., k + 1] > MARGIN), "a near-tie at the top-k cut"
  return order[..., 1:k + 1]


def _kl_div(p, s):
  """torch F.kl_div(input=p, target=s, reduction='none').sum(-1): p are probabilities, not
  log-probabilities, as the authors pass them: sum_c s log s - s p (0 log 0 = 0)."""
  return (_xlogy(s) - s * p[:, None, :]).sum(-1)


def _loss_for_grad(model, params, stats, x, s_nn, weight, s_kk, eps):
  """The same loss in jnp for the gradient (the s log s constants dropped: no gradient)."""
  p = jax.nn.softmax(_forward_fn(model, params, stats, x)[1])
  const = jnp.mean(jnp.sum(0.1 * -jnp.sum(s_kk * p[:, None, :], -1), 1))
  near = jnp.mean(jnp.sum(weight * -jnp.sum(s_nn * p[:, None, :], -1), 1))
  m = jnp.mean(p, 0)
  return const + near + jnp.sum(m * jnp.log(m + eps))


_grad = jax.jit(jax.grad(_loss_for_grad, argnums=1), static_argnums=(0, 7))


def _ref_step(model, ref, batch, config):
  """One iteration of the authors' loop; `ref` holds float64 numpy trees and banks."""
  it = ref["it"] + 1                                       # iter_num += 1 before lr_scheduler
  lr = config.optim.lr * (1 + 10 * it / T) ** -0.75
  x = _input(batch, config)
  feat, logits, new_stats = _forward(model, _f32(ref["params"]), _f32(ref["stats"]), x)
  p = _softmax(np.asarray(logits, np.float64))
  fn = _l2n(np.asarray(feat, np.float64))
  idx = batch["index"]
  fea_bank, score_bank = ref["fea_bank"].copy(), ref["score_bank"].copy()
  fea_bank[idx], score_bank[idx] = fn, p                   # written before the query
  idx_near = _topk_after_first(fn @ fea_bank.T, K)                          # B x K
  idx_near_near = _topk_after_first(fea_bank[idx_near] @ fea_bank.T, KK)    # B x K x KK
  match = (idx_near_near == idx[:, None, None]).sum(-1).astype(np.float64)
  weight = np.where(match > 0, match, 0.1)
  s_nn = score_bank[idx_near]
  s_kk = score_bank[idx_near_near].reshape(B, K * KK, C)
  expanded = np.mean((_kl_div(p, s_kk) * 0.1).sum(1))
  near = np.mean((_kl_div(p, s_nn) * weight).sum(1))
  msoftmax = p.mean(0)
  diversity = np.sum(msoftmax * np.log(msoftmax + 1e-5))
  grad = _np(_grad(model, _f32(ref["params"]), _f32(ref["stats"]), x, _f32(s_nn), _f32(weight),
                   _f32(s_kk), 1e-5))
  params, buf = torch_sgd(ref["params"], grad, ref["buf"], lr=lr, optim=AUTHORS_SGD,
                          group_of=eercl.PARAM_GROUPS)
  new = dict(it=it, params=params, buf=buf, stats=_np(new_stats), fea_bank=fea_bank,
             score_bank=score_bank)
  info = dict(loss=expanded + near + diversity, near=near, expanded=expanded,
              diversity=diversity, weight=weight, lr=lr)
  return new, info


# ------------------------------------------------------------------------------------------------
# the tests

def _bank_contents(rs):
  """Known banks: random unit features and softmax scores (the batches' rows are overwritten)."""
  return feature_banks.Banks(feat=jnp.asarray(_l2n(rs.randn(N, D)), jnp.float32),
                             score=jnp.asarray(_softmax(2 * rs.randn(N, C)), jnp.float32))


def _check_update(new, old, want_new, want_old, what):
  """Each parameter's update new - old against the reference's, leaf by leaf: float32 rounding
  of the stored parameter (a few ulps of its largest entry) on top of the usual tolerance."""
  def check(path, n, o, wn, wo):
    got = np.float64(n) - np.float64(o)
    want = np.float64(wn) - np.float64(wo)
    ulp = float(np.spacing(np.float32(np.max(np.abs(o), initial=0.0))))
    tol = max(8 * ulp, 1e-4 * float(np.max(np.abs(want), initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=tol,
                               err_msg=f"{what}{jax.tree_util.keystr(path)}")
  jax.tree_util.tree_map_with_path(check, new, old, want_new, want_old)


# The ViT steps are in the fast tier; the ResNet's (BN inside the backbone too) are slower.
@pytest.mark.parametrize("backbone", [pytest.param("resnet", marks=pytest.mark.slow), "vit"])
def test_two_nrc_steps_match_the_authors(backbone):
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
  for info in (info1, info2):    # the bank makes both weights occur
    assert 0 < np.sum(info["weight"] == 1.0) < info["weight"].size, info["weight"]

  for what, (got, m, ref, info) in {"step 1 ": (state1, m1, ref1, info1),
                                    "step 2 ": (state2, m2, ref2, info2)}.items():
    for key, want in (("train/loss", info["loss"]), ("train/nrc_neighbours", info["near"]),
                      ("train/nrc_expanded", info["expanded"]),
                      ("train/nrc_diversity", info["diversity"]),
                      ("train/reciprocal", np.mean(info["weight"] == 1.0))):
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
  adapt_family.baseline(config, "nrc")
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
      rows = host["index"][host["valid"]]
      views.setdefault(view, {}).update(zip(rows, host["image"][host["valid"]]))
      if view == "weak":
        x = _input(host, config)
        feat, logits = model.apply(variables, x, train=False)
        valid = host["valid"]
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
