"""Schedules against their formula and the original's figures; the optimiser against PyTorch's
SGD update rule written out in numpy."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from eercl_jax import config_defaults, optim
from eercl_jax.models import registry


@pytest.mark.parametrize("t,expected", [(0, 1.0), (1000, 0.26085), (5000, 0.08685),
                                        (10000, 0.05240), (19999, 0.03139)])
def test_inv_lr_factor_matches_original_figures(t, expected):
  # docs/method.md#source-optimiser-and-invlr-schedule: FER source config gamma 0.005, power 0.75.
  assert float(optim.inv_lr_factor(t, 0.005, 0.75)) == pytest.approx(expected, abs=1e-5)


def test_schedules_follow_formula():
  cfg = config_defaults.source_config().optim
  sched = optim.make_schedule(cfg)
  for t in [0, 1, 17, 500, 1999]:
    want = cfg.lr * (1 + cfg.gamma * t) ** (-cfg.power)
    assert float(sched(t)) == pytest.approx(want, rel=1e-6)
  const = optim.make_schedule(config_defaults.adapt_config("ck").optim)
  assert float(const(0)) == float(const(12345)) == pytest.approx(4e-4)
  bad = ml_collections.ConfigDict(dict(cfg))
  bad.schedule = "cosine"
  with pytest.raises(ValueError, match="config.optim.schedule"):
    optim.make_schedule(bad)


def _torch_sgd(params, grads_seq, lrs, wd, momentum):
  """PyTorch SGD(nesterov, dampening 0, coupled wd) for a list of steps, in numpy."""
  p, buf = params.copy(), None
  for g, lr in zip(grads_seq, lrs):
    d = g + wd * p
    buf = d.copy() if buf is None else momentum * buf + d
    d = d + momentum * buf
    p = p - lr * d
  return p


def test_optimizer_equals_torch_sgd_per_group_and_freezes():
  cfg = config_defaults.source_config().optim
  params = {"backbone": jnp.array([1.0, -2.0, 0.5]), "classifier": jnp.array([0.3, 0.7]),
            "sfda": jnp.array([2.0])}
  labels = lambda p: {k: k for k in p}
  cfg.lr_mult = {"backbone": 0.1, "classifier": 10.0, "sfda": 10.0}
  rng = np.random.default_rng(0)
  grads_seq = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
               for _ in range(5)]
  for frozen in [(), ("classifier",)]:
    tx = optim.make_optimizer(cfg, labels, frozen=frozen)
    state, p = tx.init(params), params
    for g in grads_seq:
      updates, state = tx.update(g, state, p)
      p = jax.tree_util.tree_map(lambda a, b: a + b, p, updates)
    for k in params:
      lrs = [cfg.lr * cfg.lr_mult[k] * (1 + cfg.gamma * t) ** (-cfg.power) for t in range(5)]
      want = (np.asarray(params[k]) if k in frozen else
              _torch_sgd(np.asarray(params[k]), [g[k] for g in grads_seq], lrs,
                         cfg.weight_decay, cfg.momentum))
      np.testing.assert_allclose(np.asarray(p[k]), want, rtol=1e-5, atol=1e-7)


def test_unknown_group_is_an_error():
  c = config_defaults.source_config()
  mult = registry.lr_mult(c.model, c.optim)
  tx = optim.make_optimizer(c.optim, lambda p: {k: "nope" for k in p}, mult)
  with pytest.raises(ValueError, match="lr_mult has no entry"):
    tx.init({"w": jnp.ones(2)})
  # A misspelt frozen group would leave the classifier trainable: it is an error.
  with pytest.raises(ValueError, match=r"frozen parameter group\(s\) \['classifer'\]"):
    optim.make_optimizer(c.optim, lambda p: p, mult, frozen=("classifer",))
  c.optim.lr_mult.sfda = 3.0          # a config value wins over the backbone's default
  assert registry.lr_mult(c.model, c.optim) == {**mult, "sfda": 3.0}
  c.model.backbone = "resnet"         # the backbone's own multipliers follow the backbone
  assert registry.lr_mult(c.model, c.optim)["backbone"] == 1.0 and mult["backbone"] == 0.1
