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
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import adapt as adapt_family
from configs import demo_adapt
from eercl_jax import losses, parallel, train_adapt
from eercl_jax.models import eercl
from tests import method_reference as ref_lib
from tests.conftest import assert_trees_close as _close, random_variables

B, N = 8, 24           # batch, target images (bank rows)
C, D = 7, 8            # classes, feature dim
K = 3                  # neighbours
T = 20                 # the run's length: alpha(1) = 1.5^-5 = 0.13, not alpha(0) = 1
SIZE = 16              # image side
LR0 = 0.2              # the recipe's 1e-3 raised so the updates stand far above float32 rounding
BETA = 5.0             # the authors' VisDA default


def _small_model(m, backbone):
  ref_lib.set_tiny_model(m, backbone, feat_dim=D, num_classes=C)


def _config(backbone):
  c = adapt_family.get_config(f"method=aad,backbone={backbone}")
  ref_lib.assert_nrc_aad_authors_recipe(c)   # checked here, its lr then raised: LR0
  assert (c.aad.beta, c.aad.alpha) == (BETA, 1.0)
  c.optim.lr = LR0
  _small_model(c.model, backbone)
  c.batch_size = c.bn_group_size = B
  c.num_steps = T
  c.aad.k = K
  return c


# ------------------------------------------------------------------------------------------------
# the reference: the authors' train_target, one iteration

def _aad_terms(p, score_near):
  """(attract, disperse) as the authors: mean_i sum_k F.kl_div(p, s).sum(-1) (p probabilities:
  sum_c s log s - s p) and mean_i sum_{j != i} p_i . p_j."""
  attract = np.mean(ref_lib.torch_kl_div_of_probs(p, score_near).sum(1))
  mask = 1.0 - np.eye(len(p))
  disperse = np.mean(((p @ p.T) * mask).sum(-1))
  return attract, disperse


def _loss_for_grad(model, params, stats, x, score_near, alpha):
  """The same loss in jnp for the gradient (the s log s constant dropped: no gradient); the
  disperse term's second factor `copy = softmax_out.T` is not detached (theirs neither)."""
  p = jax.nn.softmax(ref_lib.train_forward(model, params, stats, x)[1])
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
  fwd = ref_lib.bank_forward_and_write(model, ref, batch, config)
  p, fea_bank, score_bank = fwd.p, fwd.fea_bank, fwd.score_bank
  score_near = score_bank[ref_lib.topk_after_self(fwd.fn @ fea_bank.T, K)]
  attract, disperse = _aad_terms(p, score_near)
  grad = ref_lib.float64_tree(_grad(model, fwd.params32, fwd.stats32, fwd.x,
                                    jnp.asarray(score_near, jnp.float32), np.float32(alpha)))
  info = dict(loss=attract + alpha * disperse, attract=attract, disperse=disperse, alpha=alpha)
  return ref_lib.next_bank_ref(ref, fwd, grad, lr), info


# ------------------------------------------------------------------------------------------------
# the tests

# The ViT steps are in the fast tier; the ResNet's (BN inside the backbone too) are slower.
@pytest.mark.parametrize("backbone", [pytest.param("resnet", marks=pytest.mark.slow), "vit"])
def test_two_aad_steps_match_the_authors(backbone):
  config = _config(backbone)
  model = eercl.create_model(config.model)
  run = ref_lib.run_two_bank_steps(config, model, np.random.RandomState(3), _ref_step,
                                   num_images=N, size=SIZE)
  assert run.built.method.frozen_groups() == ()            # the classifier is trained
  info1, info2 = run.infos
  assert info1["alpha"] == 1.0 and info2["alpha"] == pytest.approx(1.5 ** -5)
  ref_lib.assert_bank_steps_match(run, lambda info: (
      ("train/loss", info["loss"]), ("train/aad_attract", info["attract"]),
      ("train/aad_disperse", info["disperse"]), ("train/alpha", info["alpha"])))


def test_bank_fill_is_an_eval_pass_over_the_weak_view(data_dir, monkeypatch):
  """The refresh before the first step writes every target image's row once: the L2-normalised
  features and the softmax of an eval-mode forward (BN running statistics) of the weak view (the
  authors' training loader), nothing else of the state changing."""
  monkeypatch.chdir(data_dir)
  ref_lib.assert_bank_fill_is_an_eval_pass_over_the_weak_view("aad")


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
  bank = jax.device_get(ref_lib.random_banks(rs, N, D, C))
  mesh = parallel.create_mesh(jax.devices()[:1])
  weak, idx = ref_lib.random_images(rs, B, SIZE), rs.permutation(N)[:B].astype(np.int32)
  label = np.zeros(B, np.int32)

  out = {}
  for name, c, batch in (
      ("eercl", ce, dict(weak=weak, strong1=weak, strong2=weak, index=idx, label=label)),
      ("aad", ca, dict(image=weak, index=idx, label=label))):
    built = train_adapt.build(c, mesh, ref_lib.float32_tree(variables), N)
    banks = built.state.banks
    banks = (banks.replace(aad_feat=jnp.asarray(bank.feat), aad_score=jnp.asarray(bank.score))
             if name == "eercl" else ref_lib.float32_tree(bank))
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
  x = ref_lib.normalize_images(weak, ce)
  p = ref_lib.softmax(ref_lib.train_forward_jit(model, variables["params"],
                                                variables["batch_stats"], x)[1])
  near = ref_lib.topk_after_self(feat_bank[idx] @ feat_bank.T, K)
  attract, disperse = _aad_terms(p, score_bank[near])
  assert float(me["train/loss"]) == pytest.approx(
      AAD_WEIGHT * (attract + decay * disperse) / W, rel=1e-5)
  # Gradients: each update is -lr x gradient.
  source = ref_lib.float64_tree(variables["params"])
  scaled = jax.tree_util.tree_map(lambda n, o: o + AAD_WEIGHT / W * (n - o),
                                  ref_lib.float64_tree(s.params), source)
  ref_lib.assert_updates_close(e.params, variables["params"], scaled, source,
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
