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
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import adapt as adapt_family
from eercl_jax.models import eercl
from tests import method_reference as ref_lib

B, N = 8, 24           # batch, target images (bank rows)
C, D = 7, 8            # classes, feature dim
K, KK = 3, 3           # neighbours, expanded neighbours
T = 20                 # the run's length (the lr schedule)
SIZE = 16              # image side
LR0 = 0.2              # the recipe's 1e-3 raised so the updates stand far above float32 rounding


def _config(backbone):
  c = adapt_family.get_config(f"method=nrc,backbone={backbone}")
  ref_lib.assert_nrc_aad_authors_recipe(c)   # checked here, its lr then raised: LR0
  assert (c.nrc.affinity, c.nrc.expanded_weight, c.nrc.epsilon) == (0.1, 0.1, 1e-5)
  c.optim.lr = LR0
  ref_lib.set_tiny_model(c.model, backbone, feat_dim=D, num_classes=C)
  c.batch_size = c.bn_group_size = B
  c.num_steps = T
  c.nrc.k, c.nrc.kk = K, KK
  return c


# ------------------------------------------------------------------------------------------------
# the reference: the authors' train_target, one iteration

def _loss_for_grad(model, params, stats, x, s_nn, weight, s_kk, eps):
  """The same loss in jnp for the gradient (the s log s constants dropped: no gradient)."""
  p = jax.nn.softmax(ref_lib.train_forward(model, params, stats, x)[1])
  const = jnp.mean(jnp.sum(0.1 * -jnp.sum(s_kk * p[:, None, :], -1), 1))
  near = jnp.mean(jnp.sum(weight * -jnp.sum(s_nn * p[:, None, :], -1), 1))
  m = jnp.mean(p, 0)
  return const + near + jnp.sum(m * jnp.log(m + eps))


_grad = jax.jit(jax.grad(_loss_for_grad, argnums=1), static_argnums=(0, 7))


def _ref_step(model, ref, batch, config):
  """One iteration of the authors' loop; `ref` holds float64 numpy trees and banks."""
  it = ref["it"] + 1                                       # iter_num += 1 before lr_scheduler
  lr = config.optim.lr * (1 + 10 * it / T) ** -0.75
  fwd = ref_lib.bank_forward_and_write(model, ref, batch, config)
  p, fea_bank, score_bank, idx = fwd.p, fwd.fea_bank, fwd.score_bank, batch["index"]
  idx_near = ref_lib.topk_after_self(fwd.fn @ fea_bank.T, K)                      # B x K
  idx_near_near = ref_lib.topk_after_self(fea_bank[idx_near] @ fea_bank.T, KK)    # B x K x KK
  match = (idx_near_near == idx[:, None, None]).sum(-1).astype(np.float64)
  weight = np.where(match > 0, match, 0.1)
  s_nn = score_bank[idx_near]
  s_kk = score_bank[idx_near_near].reshape(B, K * KK, C)
  expanded = np.mean((ref_lib.torch_kl_div_of_probs(p, s_kk) * 0.1).sum(1))
  near = np.mean((ref_lib.torch_kl_div_of_probs(p, s_nn) * weight).sum(1))
  msoftmax = p.mean(0)
  diversity = np.sum(msoftmax * np.log(msoftmax + 1e-5))
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  grad = ref_lib.float64_tree(_grad(model, fwd.params32, fwd.stats32, fwd.x, f32(s_nn),
                                    f32(weight), f32(s_kk), 1e-5))
  info = dict(loss=expanded + near + diversity, near=near, expanded=expanded,
              diversity=diversity, weight=weight, lr=lr)
  return ref_lib.next_bank_ref(ref, fwd, grad, lr), info


# ------------------------------------------------------------------------------------------------
# the tests

# The ViT steps are in the fast tier; the ResNet's (BN inside the backbone too) are slower.
@pytest.mark.parametrize("backbone", [pytest.param("resnet", marks=pytest.mark.slow), "vit"])
def test_two_nrc_steps_match_the_authors(backbone):
  config = _config(backbone)
  model = eercl.create_model(config.model)
  run = ref_lib.run_two_bank_steps(config, model, np.random.RandomState(3), _ref_step,
                                   num_images=N, size=SIZE)
  assert run.built.method.frozen_groups() == ()            # the classifier is trained
  for info in run.infos:         # the bank makes both weights occur
    assert 0 < np.sum(info["weight"] == 1.0) < info["weight"].size, info["weight"]
  ref_lib.assert_bank_steps_match(run, lambda info: (
      ("train/loss", info["loss"]), ("train/nrc_neighbours", info["near"]),
      ("train/nrc_expanded", info["expanded"]), ("train/nrc_diversity", info["diversity"]),
      ("train/reciprocal", np.mean(info["weight"] == 1.0))))


def test_bank_fill_is_an_eval_pass_over_the_weak_view(data_dir, monkeypatch):
  """The refresh before the first step writes every target image's row once: the L2-normalised
  features and the softmax of an eval-mode forward (BN running statistics) of the weak view (the
  authors' training loader), nothing else of the state changing."""
  monkeypatch.chdir(data_dir)
  ref_lib.assert_bank_fill_is_an_eval_pass_over_the_weak_view("nrc")
