"""EERCL's loss terms as switches (methods/eercl.py): a term whose weight is 0 is neither computed
nor logged, and the other terms are untouched.

The whole step against the original's maths is tests/test_adapt_step_reference.py (and EERCL
with both relation terms off against the AaD method: tests/test_method_aad.py); here the same
state and batch go through the full step and through the step with each weight set to 0 in
turn, on a tiny ViT with random variables: traced (what the program reads, writes and logs; the
fast tier) and run (the values; slow: four programs to compile).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo_adapt
from eercl_jax import parallel, train_adapt
from eercl_jax.models import eercl
from tests import method_reference as ref_lib
from tests.conftest import random_variables

W, B = 2, 4            # virtual devices (BN groups), images per group
BG = W * B             # batch
N, M = 20, 12          # target images, negative ring rows
C, D = 7, 8            # classes, feature dim
SIZE = 16              # image side
STEP = 1               # the step index: the dispersion decay is not 1 there

# The metrics each term logs, and the state its skipped work would have read.
TERMS = {
    "aad_weight": dict(keys={"train/aad_attract", "train/aad_disperse"},
                       reads={"banks.aad_feat", "banks.aad_score", "batch.index"}),
    "class_contrast_weight": dict(
        keys={"train/class_contrast", "train/mask", "count/mask", "count/mask_correct",
              "count/cluster_mask_correct"},
        reads={"banks.prototypes", "batch.label"}),
    "instance_nce_weight": dict(
        keys={"train/instance_nce"},
        reads={"banks.neg_weak", "banks.neg_strong", "banks.neg_weak_ptr",
               "banks.neg_strong_ptr"}),
}


def _config(**weights):
  c = demo_adapt.get_config()
  ref_lib.set_tiny_model(c.model, "vit", feat_dim=D, num_classes=C)
  c.batch_size, c.bn_group_size, c.virtual_devices = BG, B, W
  c.num_steps = 4
  a = c.adapt
  a.negative_bank_size, a.aad_neighbours, a.aad_decay_power = M, 3, 0.75
  a.aad_weight, a.class_contrast_weight, a.instance_nce_weight = 0.7, 1.3, 0.9
  a.mask_threshold = 0.0                 # every row in the contrast: a non-zero term
  a.shard_banks = False
  a.update(weights)
  return c


def _name(path):
  keys = [getattr(k, "name", getattr(k, "key", getattr(k, "idx", None))) for k in path]
  return ".".join(str(k) for k in keys)


def _program(step, state, batch):
  """What the step's traced program does with its inputs: (names of the inputs it never reads
  (`banks.x`, `batch.y`, ...; passing one through to the output is not a read), names of the
  state it returns unchanged (its output is the input itself), names of its primitives)."""
  closed = jax.make_jaxpr(step)(state, batch)
  jaxpr, ins, outs = closed.jaxpr, list(closed.jaxpr.invars), list(closed.jaxpr.outvars)
  while len(jaxpr.eqns) == 1 and "jaxpr" in jaxpr.eqns[0].params:   # the jit around the step
    eqn = jaxpr.eqns[0]
    inner = eqn.params["jaxpr"]
    inner = getattr(inner, "jaxpr", inner)
    ins = [inner.invars[eqn.invars.index(v)] for v in ins]
    outs = [inner.outvars[eqn.outvars.index(v)] for v in outs]
    jaxpr = inner
  used = {id(v) for e in jaxpr.eqns for v in e.invars if not hasattr(v, "val")}  # no literals

  def primitives(j):
    for e in j.eqns:
      yield e.primitive.name
      for p in e.params.values():
        for sub in (p if isinstance(p, (tuple, list)) else (p,)):
          sub = getattr(sub, "jaxpr", sub)
          if hasattr(sub, "eqns"):
            yield from primitives(sub)

  def names(tree, prefix):
    return [prefix + _name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  in_names = names(state, "") + names(batch, "batch.")
  unread = {n for n, v in zip(in_names, ins) if id(v) not in used}
  state_in = dict(zip(in_names, ins))
  unchanged = {n for n, v in zip(names(state, ""), outs) if v is state_in[n]}
  return unread, unchanged, set(primitives(jaxpr))


def _setup(rs):
  config = _config()
  variables = jax.device_get(random_variables(eercl.create_model(config.model), rs, SIZE))
  f = rs.randn(N, D)
  known = dict(aad_feat=f / np.linalg.norm(f, axis=1, keepdims=True),
               aad_score=ref_lib.softmax(2 * rs.randn(N, C)), prototypes=rs.randn(C, D),
               neg_weak=ref_lib.softmax(2 * rs.randn(M, C)),
               neg_strong=ref_lib.softmax(2 * rs.randn(M, C)))
  img = lambda: rs.randint(0, 256, (BG, SIZE, SIZE, 3)).astype(np.uint8)
  batch = dict(weak=img(), strong1=img(), strong2=img(),
               index=rs.permutation(N)[:BG].astype(np.int32),
               label=rs.randint(0, C, BG).astype(np.int32))
  return variables, known, batch


def _built(case, variables, known, mesh):
  """(build, its initial state with the known banks at step STEP) of `case`: 'full', or the name
  of the weight set to 0."""
  c = _config(**({} if case == "full" else {case: 0.0}))
  built = train_adapt.build(c, mesh, jax.tree_util.tree_map(jnp.asarray, variables), N)
  banks = built.state.banks.replace(**{k: jnp.asarray(v, jnp.float32) for k, v in known.items()})
  state = built.state.replace(step=jnp.asarray(STEP, jnp.int32), banks=banks)
  return built, jax.device_put(state, built.shardings)


CASES = ("full",) + tuple(TERMS)


def _weighted_sum(metrics, config):
  """The loss as the sum of the weighted terms the step logs."""
  a = config.adapt
  decay = (1 + 10 * STEP / config.num_steps) ** -a.aad_decay_power
  total = 0.0
  if a.aad_weight:
    total += a.aad_weight * (metrics["train/aad_attract"]
                             + decay * metrics["train/aad_disperse"]) / config.virtual_devices
  if a.class_contrast_weight:
    total += a.class_contrast_weight * metrics["train/class_contrast"]
  if a.instance_nce_weight:
    total += a.instance_nce_weight * metrics["train/instance_nce"]
  return total


def test_a_zero_weight_term_is_not_in_the_program():
  """Traced, not run (fast): the step with a weight 0 logs none of that term's metrics, never
  reads the state only that term reads, returns the banks only that term writes unchanged (the
  output is the input), and with aad_weight = 0 runs no neighbour query; the full step does all
  of it."""
  variables, known, batch = _setup(np.random.RandomState(11))
  mesh = parallel.create_mesh(jax.devices()[:1])
  sharded = parallel.shard_batch(batch, mesh)
  traced = {}
  for case in CASES:
    built, state = _built(case, variables, known, mesh)
    keys = set(jax.eval_shape(built.step, state, sharded)[1])
    traced[case] = (keys,) + _program(built.step, state, sharded)
  keys, unread, unchanged, prims = traced["full"]
  assert all(TERMS[t]["keys"] <= keys for t in TERMS), keys
  assert not unread & set().union(*(TERMS[t]["reads"] for t in TERMS)), unread
  assert not unchanged & {"banks.aad_feat", "banks.aad_score", "banks.neg_weak",
                          "banks.neg_strong", "banks.neg_weak_ptr", "banks.neg_strong_ptr"}
  assert "top_k" in prims
  for term in TERMS:
    t_keys, t_unread, t_unchanged, t_prims = traced[term]
    assert t_keys == keys - TERMS[term]["keys"], term
    assert TERMS[term]["reads"] <= t_unread, (term, t_unread)
    assert t_unread - TERMS[term]["reads"] == unread, term   # the other terms' reads stay
    written = {"aad_weight": {"banks.aad_feat", "banks.aad_score"},
               "instance_nce_weight": TERMS[term]["reads"]}.get(term, set())
    assert t_unchanged == unchanged | written, (term, t_unchanged)
    assert ("top_k" in t_prims) == (term != "aad_weight"), term


@pytest.fixture(scope="module")
def ran():
  """{case: (metrics, state before, state after)} of one step of the same state and batch with
  every term on ('full') and with each weight 0 in turn."""
  variables, known, batch = _setup(np.random.RandomState(11))
  mesh = parallel.create_mesh(jax.devices()[:1])
  out = {}
  for case in CASES:
    built, state = _built(case, variables, known, mesh)
    before = jax.device_get(state)
    after, metrics = jax.device_get(built.step(state, parallel.shard_batch(batch, mesh)))
    out[case] = ({k: float(v) for k, v in metrics.items()}, before, after)
  return out


@pytest.mark.slow      # four step programs compiled
@pytest.mark.parametrize("term", list(TERMS))
def test_a_zero_weight_term_leaves_the_others_as_they_were(ran, term):
  """Run: the other terms' values are the full step's, the loss is the sum of the remaining
  weighted terms, and the banks only that term writes are unchanged."""
  full, full_before, full_after = ran["full"]
  assert full["train/loss"] == pytest.approx(_weighted_sum(full, _config()), rel=1e-6)
  assert all(full[k] != 0 for t in TERMS for k in TERMS[t]["keys"] if k.startswith("train/"))
  metrics, before, after = ran[term]
  assert set(metrics) == set(full) - TERMS[term]["keys"]
  for key in set(metrics) - {"train/loss"}:
    assert metrics[key] == pytest.approx(full[key], rel=1e-6, abs=1e-7), key
  assert metrics["train/loss"] == pytest.approx(_weighted_sum(full, _config(**{term: 0.0})),
                                                rel=1e-6)
  names = {"aad_weight": ("aad_feat", "aad_score"),
           "instance_nce_weight": ("neg_weak", "neg_strong", "neg_weak_ptr", "neg_strong_ptr")}
  for name in names.get(term, ()):
    assert not np.array_equal(getattr(full_after.banks, name), getattr(full_before.banks, name))
    np.testing.assert_array_equal(getattr(after.banks, name), getattr(before.banks, name))
