"""Two whole adaptation steps of `train_adapt.adapt_step` against an independent restatement of
the original two-GPU PyTorch trainer.

The reference below is written per GPU, as the original ran: W = 2 GPUs, each holding B images
in three views and running plain BN over its own 3B rows; all-gathers are rank-major
concatenations; DDP averages the per-GPU gradients; torch SGD (coupled weight decay, Nesterov)
runs per parameter group in numpy (the formulas: docs/method.md#adaptation-stage). It shares
nothing with the code under test but the network's forward (`model.apply` with `bn_groups=1` on
one GPU's slice: the network is not what is tested here) and the one random draw the port
makes for shuffle-BN (the permutation from `fold_in(state.rng, state.step)`). What is under test
is everything around the network: BN grouping of the views, the teacher shuffle, the EMA, the
AaD bank write and neighbour query, the loss composition and its 1/W scaling, the optimiser
groups, and the negative ring buffers.
"""
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo_adapt
from eercl_jax import parallel, train_adapt
from eercl_jax.models import eercl
from tests import method_reference as ref_lib
from tests.conftest import assert_trees_close as _close, random_variables, torch_sgd

W, B = 2, 4            # GPUs of the original, images per GPU
BG = W * B             # global batch
N = 20                 # target images (bank rows)
M = 12                 # negative ring size: 0 -> 8, then 8 -> 12 (truncated write) -> wraps to 0
C, D = 7, 8            # classes, feature dim
SIZE = 16              # image side


# ------------------------------------------------------------------------------------------------
# set-up

def _model(backbone):
  return ref_lib.tiny_model(backbone, feat_dim=D, num_classes=C)


def _config(backbone):
  c = demo_adapt.get_config()
  # = _model(backbone): the build makes the same network
  ref_lib.set_tiny_model(c.model, backbone, feat_dim=D, num_classes=C)
  c.batch_size, c.bn_group_size, c.virtual_devices = BG, B, W
  c.num_steps = 4                        # the AaD dispersion decay then differs between steps
  a = c.adapt
  a.negative_bank_size, a.aad_neighbours, a.ema_decay = M, 3, 0.99
  a.aad_decay_power = 0.75               # lambda_t = (1 + 10 it / max_iters)^-beta
  a.aad_weight, a.class_contrast_weight, a.instance_nce_weight = 0.7, 1.3, 0.9
  a.class_contrast_temp, a.instance_nce_temp = 0.1, 0.2
  a.shard_banks = False
  o = c.optim
  o.lr, o.weight_decay, o.momentum, o.nesterov = 0.1, 0.01, 0.9, True
  o.schedule, o.gamma, o.power = "inv", 0.5, 0.75
  # Distinct multipliers, so a parameter in the wrong group shows.
  o.lr_mult = {"backbone": 0.5, "bottleneck": 0.7, "mlp": 1.5, "sfda": 2.0, "classifier": 10.0}
  return c


def _batch(rs, indices):
  img = lambda: rs.randint(0, 256, (BG, SIZE, SIZE, 3)).astype(np.uint8)
  return dict(weak=img(), strong1=img(), strong2=img(), index=np.asarray(indices, np.int32),
              label=rs.randint(0, C, BG).astype(np.int32))


def _known_banks(banks, rs):
  """Deterministic, known bank contents in place of the initial ones (the relation matrix that
  create_state computed from the classifier is kept: the reference reads it from the state)."""
  aad = ref_lib.random_banks(rs, N, D, C)      # unit features, softmax scores
  return banks.replace(
      aad_feat=aad.feat, aad_score=aad.score,
      prototypes=jnp.asarray(rs.randn(C, D), jnp.float32),
      neg_weak=jnp.asarray(ref_lib.softmax(2 * rs.randn(M, C)), jnp.float32),
      neg_strong=jnp.asarray(ref_lib.softmax(2 * rs.randn(M, C)), jnp.float32))


# ------------------------------------------------------------------------------------------------
# the reference: the original's per-GPU computation

def _gpu_input(batch, config, r):
  """GPU r's network input: its own rows of each view, concatenated [s1_r; s2_r; w_r]."""
  rows = slice(r * B, (r + 1) * B)
  return np.concatenate([ref_lib.normalize_images(batch[k][rows], config)
                         for k in ("strong1", "strong2", "weak")])


def _mean_stats(per_gpu):
  # Each GPU's update is running*(1-m) + m*stat_r; the port tracks their mean.
  return jax.tree_util.tree_map(lambda *s: np.mean([np.asarray(x, np.float64) for x in s], 0),
                                *per_gpu)


class _LossSettings(typing.NamedTuple):
  """The original trainer's names for the loss settings (docs/config-keys.md)."""
  lambda_aad: float
  lambda_fixmatch: float
  lambda_nce: float
  fixmatch_temp: float
  nce_temp: float


def _ref_teacher(model, ref, batch, config):
  """EMA, then the teacher forward with shuffle-BN. Returns (teacher params, teacher stats,
  q_s1, q_s2, q_w, normalised weak features), each (BG, ...) in rank-major order."""
  m = config.adapt.ema_decay
  teacher = jax.tree_util.tree_map(lambda t, o: m * t + (1 - m) * o, ref["teacher"],
                                   ref["params"])
  # Global teacher input: GPU-major, within a GPU s1, s2, w.
  t_in = np.concatenate([_gpu_input(batch, config, r) for r in range(W)])     # (W*3B, ...)
  rng = jax.random.fold_in(ref["rng"], ref["step"])
  perm_rng, _, _ = jax.random.split(rng, 3)
  perm = np.asarray(jax.random.permutation(perm_rng, W * 3 * B))
  shuffled = t_in[perm]
  feats, logits, stats = [], [], []
  for g in range(W):             # GPU g normalises its slice of the shuffled batch
    f, l, s = ref_lib.train_forward_jit(model, ref_lib.float32_tree(teacher),
                                        ref_lib.float32_tree(ref["teacher_stats"]),
                                        shuffled[g * 3 * B:(g + 1) * 3 * B])
    feats.append(np.asarray(f, np.float64))
    logits.append(np.asarray(l, np.float64))
    stats.append(s)
  feat, logit = np.empty((W * 3 * B, D)), np.empty((W * 3 * B, C))
  feat[perm], logit[perm] = np.concatenate(feats), np.concatenate(logits)    # un-shuffle
  prob = ref_lib.softmax(logit)

  def view(x, v):  # rank-major global rows of view v (0: s1, 1: s2, 2: w)
    return np.concatenate([x[r * 3 * B + v * B: r * 3 * B + (v + 1) * B] for r in range(W)])

  return (teacher, _mean_stats(stats), view(prob, 0), view(prob, 1), view(prob, 2),
          ref_lib.l2_normalize(view(feat, 2)))


def _gpu_loss(model, a, params, stats, x, r, lam_t, p_w_gathered, s_near, protos, q_s1_r,
              q_s2_r, q_w_r, mask_r, neg_weak, neg_strong, rel):
  """The loss of GPU r of the original, on its own rows only (`a`: the loss settings)."""
  feat, logits, new_stats = ref_lib.train_forward(model, params, stats, x)
  p = jax.nn.softmax(logits)
  p_s1, p_s2, p_w = p[:B], p[B:2 * B], p[2 * B:]
  # AaD on the gathered batch: only this GPU's rows carry gradient.
  big_p = jax.lax.dynamic_update_slice(p_w_gathered, p_w, (r * B, 0))
  l_pos = jnp.sum(s_near * (jnp.log(s_near) - big_p[:, None, :])) / BG
  gram = big_p @ big_p.T
  l_neg = (jnp.sum(gram) - jnp.trace(gram)) / BG
  l_aad = a.lambda_aad * (l_pos + lam_t * l_neg)
  # Class contrast of the strong views against cluster labels of the online weak features.
  f_w = jax.lax.stop_gradient(feat[2 * B:])
  f_w = f_w / jnp.linalg.norm(f_w, axis=1, keepdims=True)
  yhat = jnp.argmax(f_w @ (protos / jnp.linalg.norm(protos, axis=1, keepdims=True)).T, 1)

  def contrast(q):
    logit = q @ rel.T / a.fixmatch_temp
    ce = jax.nn.logsumexp(logit, 1) - jnp.take_along_axis(logit, yhat[:, None], 1)[:, 0]
    return jnp.mean(mask_r * ce)

  l_cc = 0.5 * (contrast(p_s1) + contrast(p_s2))

  def nce(q, k, neg):
    pos = 0.5 * jnp.sum((q @ rel) * k, 1, keepdims=True)
    logit = jnp.concatenate([pos, 0.5 * (q @ rel) @ neg.T], 1) / a.nce_temp
    return 0.5 * jnp.mean(jax.nn.logsumexp(logit, 1) - logit[:, 0])

  l_nce = (nce(p_s1, q_w_r, neg_weak) + nce(p_w, q_s1_r, neg_strong)
           + nce(p_s1, q_s2_r, neg_strong)) / 3
  loss = l_aad + a.lambda_fixmatch * l_cc + a.lambda_nce * l_nce
  return loss, (new_stats, l_pos, l_neg, l_cc, l_nce)


_gpu_grad = jax.jit(jax.grad(_gpu_loss, argnums=2, has_aux=True), static_argnums=(0, 1))


def _ref_step(model, ref, batch, config):
  """One step of the original on W GPUs. `ref` holds float64 numpy trees and banks."""
  a, o = config.adapt, config.optim
  step = ref["step"]
  teacher, teacher_stats, q_s1, q_s2, q_w, ft_w = _ref_teacher(model, ref, batch, config)

  # AaD bank write before the loss, then the neighbour query (self is the top-1 and dropped).
  idx = batch["index"]
  aad_feat, aad_score = ref["aad_feat"].copy(), ref["aad_score"].copy()
  aad_feat[idx], aad_score[idx] = ft_w, q_w
  nn_idx = np.argsort(-(ft_w @ aad_feat.T), axis=1, kind="stable")[:, 1:a.aad_neighbours + 1]
  s_near = aad_score[nn_idx]                                                 # (BG, k, C)

  mask = q_w.max(-1) >= a.mask_threshold
  relation = ref["relation"]
  lam_t = (1.0 + 10.0 * step / config.num_steps) ** (-a.aad_decay_power)

  params32, stats32 = ref_lib.float32_tree(ref["params"]), ref_lib.float32_tree(ref["stats"])
  xs = [jnp.asarray(_gpu_input(batch, config, r)) for r in range(W)]
  # Every GPU's weak probabilities, as the all-gather sees them (the other GPUs' rows are
  # constants here: their gradient flows on their own GPU, and DDP averages).
  p_w_all = np.concatenate([
      np.asarray(jax.nn.softmax(ref_lib.train_forward_jit(model, params32, stats32, x)[1]),
                 np.float64)[2 * B:] for x in xs])

  hp = _LossSettings(lambda_aad=a.aad_weight, lambda_fixmatch=a.class_contrast_weight,
                     lambda_nce=a.instance_nce_weight, fixmatch_temp=a.class_contrast_temp,
                     nce_temp=a.instance_nce_temp)
  grads, stats, terms = [], [], []
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  for r in range(W):
    rows = slice(r * B, (r + 1) * B)
    g, (s, *t) = _gpu_grad(model, hp, params32, stats32, xs[r], r, lam_t, f32(p_w_all),
                           f32(s_near), f32(ref["prototypes"]), f32(q_s1[rows]),
                           f32(q_s2[rows]), f32(q_w[rows]), f32(mask[rows]),
                           f32(ref["neg_weak"]), f32(ref["neg_strong"]), f32(relation))
    grads.append(ref_lib.float64_tree(g))
    stats.append(s)
    terms.append([np.asarray(v) for v in t])
  # DDP: the gradient is the mean over GPUs (the global AaD loss thus counts 1/W per GPU,
  # which the port writes as an explicit 1/W; checked here, not assumed).
  grad = jax.tree_util.tree_map(lambda *g: np.mean(g, 0), *grads)

  # torch SGD per group (the classifier frozen: no gradient, no decay).
  lr = o.lr * (1.0 + o.gamma * step) ** (-o.power)
  new_params, new_buf = torch_sgd(ref["params"], grad, ref["buf"], lr=lr, optim=o,
                                  group_of=eercl.PARAM_GROUPS, frozen=("classifier",))

  def ring(bank, ptr, values):
    bank = bank.copy()
    end = min(ptr + BG, M)
    bank[ptr:end] = values[:end - ptr]
    return bank, (0 if end == M else ptr + BG)

  neg_weak, neg_weak_ptr = ring(ref["neg_weak"], ref["neg_weak_ptr"], q_w)
  neg_strong, neg_strong_ptr = ring(ref["neg_strong"], ref["neg_strong_ptr"], q_s1)
  terms = np.mean(terms, 0)    # l_pos, l_neg: the same on every GPU; the rest: per-GPU means
  new = dict(ref, step=step + 1, params=new_params, buf=new_buf, stats=_mean_stats(stats),
             teacher=teacher, teacher_stats=teacher_stats, aad_feat=aad_feat,
             aad_score=aad_score, neg_weak=neg_weak, neg_weak_ptr=neg_weak_ptr,
             neg_strong=neg_strong, neg_strong_ptr=neg_strong_ptr)
  info = dict(grad=grad, mask=mask, lr=lr, aad_pos=terms[0], aad_neg=terms[1],
              contrast=terms[2], nce=terms[3])
  return new, info


# ------------------------------------------------------------------------------------------------
# the test



# The ViT step is in the fast tier; the ResNet one (BN inside the backbone too) is slower.
@pytest.mark.parametrize("backbone", [pytest.param("resnet", marks=pytest.mark.slow), "vit"])
def test_two_adapt_steps_match_the_per_gpu_original(backbone):
  config = _config(backbone)
  model = _model(backbone)
  rs = np.random.RandomState(7)
  variables = random_variables(model, rs, SIZE)
  mesh = parallel.create_mesh(jax.devices()[:1])
  built = train_adapt.build(config, mesh, variables, N)
  state = jax.device_put(built.state.replace(banks=_known_banks(built.state.banks, rs)),
                         built.shardings)
  state0 = jax.device_get(state)
  src = ref_lib.float64_tree(state0.params)

  perm = rs.permutation(N)
  batches = [_batch(rs, perm[:BG]), _batch(rs, perm[BG:2 * BG])]

  ref = dict(step=0, rng=state0.rng, params=src, buf=jax.tree_util.tree_map(np.zeros_like, src),
             stats=ref_lib.float64_tree(state0.batch_stats),
             teacher=ref_lib.float64_tree(state0.teacher_params),
             teacher_stats=ref_lib.float64_tree(state0.teacher_batch_stats),
             **{k: np.array(getattr(state0.banks, k), np.float64)
                for k in ("aad_feat", "aad_score", "prototypes", "relation", "neg_weak",
                          "neg_strong")},
             neg_weak_ptr=int(state0.banks.neg_weak_ptr),
             neg_strong_ptr=int(state0.banks.neg_strong_ptr))

  # A confidence threshold in the widest gap of step 1's teacher max-probabilities near the
  # middle, so the class-contrast term sees both masked and unmasked rows (and no row sits on the
  # threshold).
  q_w = _ref_teacher(model, ref, batches[0], config)[4]
  top = np.sort(q_w.max(-1))
  gaps = [(top[i + 1] - top[i], i) for i in range(2, BG - 3)]
  gap, i = max(gaps)
  assert gap > 1e-3, top
  config.adapt.mask_threshold = float((top[i] + top[i + 1]) / 2)

  ref1, info1 = _ref_step(model, ref, batches[0], config)
  ref2, info2 = _ref_step(model, ref1, batches[1], config)
  assert 0 < info1["mask"].sum() < BG, info1["mask"]

  # Built again: the step takes its settings (the threshold just chosen) from the config.
  step = train_adapt.build(config, mesh, variables, N).step
  out, m1 = step(state, parallel.shard_batch(batches[0], mesh))
  state1 = jax.device_get(out)            # a host copy: the next call donates `out`
  state2, m2 = jax.device_get(step(out, parallel.shard_batch(batches[1], mesh)))

  # ---- after step 1 (teacher == source: the step-1 EMA is a no-op)
  assert float(m1["count/mask"]) == info1["mask"].sum()
  # The gradient each parameter received, recovered from the first update (buf = d, so the
  # step is -lr * (1 + momentum) * (g + wd p)); the classifier must not move at all.
  o = config.optim
  for scope in src:
    group = eercl.PARAM_GROUPS[scope]
    if group == "classifier":
      jax.tree_util.tree_map(np.testing.assert_array_equal, state1.params[scope],
                             state0.params[scope])
      continue
    lr = info1["lr"] * o.lr_mult[group]
    got_grad = ref_lib.grad_from_first_sgd_step(state1.params[scope], state0.params[scope],
                                                lr=lr, momentum=o.momentum,
                                                weight_decay=o.weight_decay)
    _close(got_grad, info1["grad"][scope], what=f"grad {scope}")
  _close(state1.params, ref1["params"], what="params after step 1 ")
  _close(state1.batch_stats, ref1["stats"], what="online batch_stats ")
  _close(state1.teacher_params, ref1["teacher"], rtol=1e-6, atol=1e-7, what="teacher ")
  _close(state1.teacher_batch_stats, ref1["teacher_stats"], what="teacher batch_stats ")
  idx = batches[0]["index"]
  _close(state1.banks.aad_feat[idx], ref1["aad_feat"][idx], what="aad_feat ")
  _close(state1.banks.aad_score[idx], ref1["aad_score"][idx], what="aad_score ")
  _close(state1.banks.aad_feat, ref1["aad_feat"], what="aad_feat (all rows) ")
  _close(state1.banks.neg_weak, ref1["neg_weak"], what="neg_weak ")
  _close(state1.banks.neg_strong, ref1["neg_strong"], what="neg_strong ")
  assert int(state1.banks.neg_weak_ptr) == ref1["neg_weak_ptr"] == BG
  assert int(state1.banks.neg_strong_ptr) == ref1["neg_strong_ptr"] == BG

  # The loss terms the step reports (the AaD terms are global, the others per-GPU means).
  for key, want in (("train/aad_attract", info1["aad_pos"]),
                    ("train/aad_disperse", info1["aad_neg"]),
                    ("train/class_contrast", info1["contrast"]),
                    ("train/instance_nce", info1["nce"])):
    assert float(m1[key]) == pytest.approx(float(want), rel=1e-4, abs=1e-5), key

  # ---- after step 2: the EMA teacher moved 1% of the way to the step-1 online network.
  m = config.adapt.ema_decay
  want_teacher = jax.tree_util.tree_map(lambda s, p: m * s + (1 - m) * p, src, ref1["params"])
  _close(state2.teacher_params, want_teacher, rtol=1e-5, atol=1e-6, what="teacher after step 2 ")
  _close(state2.teacher_params, ref2["teacher"], rtol=1e-5, atol=1e-6, what="teacher ")
  _close(state2.params, ref2["params"], rtol=1e-4, atol=1e-5, what="params after step 2 ")
  _close(state2.batch_stats, ref2["stats"], what="online batch_stats after step 2 ")
  _close(state2.banks.aad_feat, ref2["aad_feat"], what="aad_feat after step 2 ")
  _close(state2.banks.aad_score, ref2["aad_score"], what="aad_score after step 2 ")
  _close(state2.banks.neg_weak, ref2["neg_weak"], what="neg_weak after step 2 ")
  _close(state2.banks.neg_strong, ref2["neg_strong"], what="neg_strong after step 2 ")
  assert int(state2.banks.neg_weak_ptr) == ref2["neg_weak_ptr"] == 0    # 8 + 8 >= 12: wraps
  assert int(state2.banks.neg_strong_ptr) == ref2["neg_strong_ptr"] == 0
  assert float(m2["count/mask"]) == info2["mask"].sum()
