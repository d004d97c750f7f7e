"""Two source training steps of `train_source.train_step` against an independent restatement of
the original PyTorch trainer.

The reference runs each BN group as one GPU of the original (plain BN over its own rows,
`bn_groups=1`), takes the label-smoothed cross-entropy with PyTorch semantics over the whole
batch, differentiates it, and applies torch SGD (coupled weight decay, Nesterov momentum) per
parameter group in float64 numpy with the InvLR schedule (docs/method.md#source-loss,
docs/method.md#source-optimiser-and-invlr-schedule); the BN running statistics are PyTorch's
update (momentum 0.1, unbiased variance) from each batch norm's recorded input, averaged over
the GPUs (docs/method.md#grouped-batch-norm). It shares nothing with the code under test but the
network's forward on one group's rows (`model.apply`: the network is not what is tested here).
What is under test is everything around it: input normalisation, the BN grouping, the config's
smoothing reaching the loss, the parameter groups and their multipliers, the schedule, frozen
groups, and the running statistics and metrics the step returns.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import demo_source
from eercl_jax import optim, parallel, train_source
from eercl_jax.models import eercl
from eercl_jax.models.layers import GroupedBatchNorm
from tests.conftest import assert_trees_close as _close, random_variables, torch_sgd

G, B = 2, 4            # BN groups (GPUs of the original), images per group
BG = G * B             # global batch
C, D = 7, 8            # classes, feature dim
SIZE = 16              # image side
SMOOTHING = 0.3        # not the default 0.1: the config's value must reach the loss

# Top-level parameter scope -> optimiser group, restated from the table in
# docs/method.md#source-optimiser-and-invlr-schedule (not read from the code under test).
GROUP_OF = {"backbone": "backbone", "bottleneck": "bottleneck", "bottleneck_bn": "bottleneck",
            "mlp": "mlp", "sfda_bottleneck": "sfda", "sfda_bn": "sfda",
            "classifier": "classifier"}


def _model():
  return eercl.EERCLModel("vit", size="mu/8", bottleneck_dim=16, width=16, feat_dim=D,
                          num_classes=C, dropout=0.0)


def _config():
  c = demo_source.get_config()
  c.model.backbone, c.model.size = "vit", "mu/8"
  c.model.bottleneck_dim = c.model.width = 16
  c.model.feat_dim, c.model.num_classes, c.model.dropout = D, C, 0.0
  c.data.resize, c.data.crop = SIZE, SIZE
  # Not ImageNet's: a normalisation with the wrong constants shows.
  c.data.mean, c.data.std = (100.0, 120.0, 140.0), (50.0, 60.0, 70.0)
  c.batch_size, c.bn_group_size = BG, B
  c.label_smoothing = SMOOTHING
  o = c.optim
  o.lr, o.weight_decay, o.momentum, o.nesterov = 0.1, 0.05, 0.9, True
  o.schedule, o.gamma, o.power = "inv", 0.5, 0.75   # step 1's factor is 1.5^-0.75, not 1
  # Distinct multipliers, so a parameter in the wrong group shows.
  o.lr_mult = {"backbone": 0.5, "bottleneck": 0.7, "mlp": 1.5, "sfda": 2.0, "classifier": 3.0}
  return c


def _batch(rs):
  return dict(image=rs.randint(0, 256, (BG, SIZE, SIZE, 3)).astype(np.uint8),
              label=rs.randint(0, C, BG).astype(np.int32))


def _np(tree):
  return jax.tree_util.tree_map(lambda x: np.array(x, np.float64), tree)


def _f32(tree):
  return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), tree)


# ------------------------------------------------------------------------------------------------
# the reference

def _ref_loss(params, stats, images, labels, model, smoothing):
  """The original's loss: each GPU's forward with plain BN over its own B rows (vmapped over the
  G GPUs: one trace of the network); PyTorch's label-smoothed CE,
  q = (1-eps) onehot + eps/C, -mean_i sum_c q log softmax, over all G*B rows. Also returns each
  batch norm's input on every GPU, from which the reference computes the running statistics."""
  def one_gpu(x):
    bn_inputs = {}

    def record(next_fun, args, kwargs, context):
      if isinstance(context.module, GroupedBatchNorm) and context.method_name == "__call__":
        bn_inputs["/".join(context.module.scope.path)] = args[0]
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
      (_, lg), _ = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                               bn_groups=1, mutable=["batch_stats"])
    return lg, bn_inputs

  logits, bn_inputs = jax.vmap(one_gpu)(images.reshape((G, B) + images.shape[1:]))
  logits = logits.reshape(G * B, C)
  z = logits - jnp.max(logits, -1, keepdims=True)
  logp = z - jnp.log(jnp.sum(jnp.exp(z), -1, keepdims=True))
  q = (1.0 - smoothing) * (labels[:, None] == jnp.arange(C)[None, :]) + smoothing / C
  loss = -jnp.mean(jnp.sum(q * logp, -1))
  return loss, (logits, bn_inputs)


def _ref_running_stats(stats, bn_inputs):
  """PyTorch's running update on each GPU, running = 0.9 running + 0.1 batch_stat with the
  unbiased variance, averaged over the G GPUs (what the port tracks)."""
  out = {}
  for path, x in bn_inputs.items():
    x = np.asarray(x, np.float64)
    x = x.reshape(G, -1, x.shape[-1])                 # (GPU, rows x spatial, F)
    old = stats
    for name in path.split("/"):
      old = old[name]
    node = out
    for name in path.split("/")[:-1]:
      node = node.setdefault(name, {})
    node[path.split("/")[-1]] = {
        "mean": 0.9 * old["mean"] + 0.1 * np.mean(x.mean(1), 0),
        "var": 0.9 * old["var"] + 0.1 * np.mean(x.var(1, ddof=1), 0)}
  return out


_ref_grad = jax.jit(jax.value_and_grad(_ref_loss, has_aux=True), static_argnums=(4, 5))


def _ref_step(model, ref, batch, config, frozen):
  o = config.optim
  mean = np.asarray(config.data.mean, np.float32)
  std = np.asarray(config.data.std, np.float32)
  images = (batch["image"].astype(np.float32) - mean) / std
  (loss, (logits, bn_inputs)), grad = _ref_grad(
      _f32(ref["params"]), _f32(ref["stats"]), jnp.asarray(images),
      jnp.asarray(batch["label"]), model, config.label_smoothing)
  grad = _np(grad)
  stats = _ref_running_stats(ref["stats"], bn_inputs)
  assert jax.tree_util.tree_structure(stats) == jax.tree_util.tree_structure(ref["stats"])

  lr = o.lr * (1.0 + o.gamma * ref["step"]) ** (-o.power)        # InvLR, t = 0-based step
  assert set(ref["params"]) == set(GROUP_OF), sorted(ref["params"])
  new_params, new_buf = torch_sgd(ref["params"], grad, ref["buf"], lr=lr, optim=o,
                                  group_of=GROUP_OF, frozen=frozen)

  logits = np.asarray(logits, np.float64)
  metrics = {"train/loss": float(loss),
             "train/accuracy": float(np.mean(np.argmax(logits, -1) == batch["label"]))}
  new = dict(step=ref["step"] + 1, params=new_params, buf=new_buf, stats=stats)
  return new, metrics, grad


# ------------------------------------------------------------------------------------------------
# the test



def _setup():
  config, model, rs = _config(), _model(), np.random.RandomState(3)
  variables = random_variables(model, rs, SIZE)
  return config, model, variables, [_batch(rs), _batch(rs)]


def _ref_init(params, batch_stats):
  src = _np(params)
  return dict(step=0, params=src, buf=jax.tree_util.tree_map(np.zeros_like, src),
              stats=_np(batch_stats))


def test_two_source_steps_match_the_per_gpu_original():
  config, model, variables, batches = _setup()
  mesh = parallel.create_mesh(jax.devices()[:1])
  built = train_source.build(config, mesh, variables=variables)
  state = built.state
  state0 = jax.device_get(state)
  ref1, want_m1, grad1 = _ref_step(model, _ref_init(state0.params, state0.batch_stats),
                                   batches[0], config, frozen=())
  ref2, want_m2, _ = _ref_step(model, ref1, batches[1], config, frozen=())

  step = built.step
  out, m1 = step(state, parallel.shard_batch(batches[0], mesh))
  state1 = jax.device_get(out)            # a host copy: the next call donates `out`
  state2, m2 = jax.device_get(step(out, parallel.shard_batch(batches[1], mesh)))
  assert int(state1.step) == 1 and int(state2.step) == 2

  # ---- step 1: the gradient each parameter received, recovered from the first update (buf = d,
  # so the step is -lr_group * (1 + momentum) * (g + wd p)): a parameter in the wrong group, or a
  # group with the wrong multiplier, shows here by name.
  o = config.optim
  for scope in state0.params:
    lr = o.lr * o.lr_mult[GROUP_OF[scope]]     # InvLR factor 1 at t = 0
    got_grad = jax.tree_util.tree_map(
        lambda new, old: (np.float64(old) - np.float64(new)) / (lr * (1 + o.momentum))
        - o.weight_decay * np.float64(old), state1.params[scope], state0.params[scope])
    _close(got_grad, grad1[scope], rtol=1e-3, atol=1e-5, what=f"grad {scope}")
  _close(state1.params, ref1["params"], what="params after step 1 ")
  _close(state1.batch_stats, ref1["stats"], what="batch_stats after step 1 ")
  assert float(m1["train/loss"]) == pytest.approx(want_m1["train/loss"], rel=1e-5)
  assert float(m1["train/accuracy"]) == want_m1["train/accuracy"]

  # ---- step 2: momentum buffers and the decayed InvLR rate.
  _close(state2.params, ref2["params"], what="params after step 2 ")
  _close(state2.batch_stats, ref2["stats"], what="batch_stats after step 2 ")
  assert float(m2["train/loss"]) == pytest.approx(want_m2["train/loss"], rel=1e-5)
  assert float(m2["train/accuracy"]) == want_m2["train/accuracy"]


def test_frozen_group_gets_no_update_and_no_weight_decay():
  """`optim.for_model(config, frozen=('classifier',))` on the reference gradients of two steps:
  the classifier stays bit-identical (its gradient and weight decay are dropped, as a PyTorch
  parameter without gradient), every other group follows torch SGD. The optimiser is the only
  part of the step that knows about frozen groups, so it is driven directly here (a second
  compiled train step would double this file's run time)."""
  config, model, variables, batches = _setup()
  frozen = ("classifier",)
  tx = optim.for_model(config, frozen=frozen)
  params0 = variables["params"]
  params, opt_state = params0, tx.init(params0)
  update = jax.jit(tx.update)
  ref = _ref_init(params0, variables["batch_stats"])
  for t, batch in enumerate(batches):
    ref, _, grad = _ref_step(model, ref, batch, config, frozen)
    assert np.max(np.abs(grad["classifier"]["v"])) > 1e-3    # a real gradient to drop
    updates, opt_state = update(_f32(grad), opt_state, params)
    params = optax.apply_updates(params, updates)
    host = jax.device_get(params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, host["classifier"],
                           jax.device_get(params0["classifier"]))
    _close(host, ref["params"], what=f"params after step {t + 1} ")
