"""Test-wide settings: 8 fake CPU devices so multi-device code is exercised on any machine, and a
small synthetic FER data set shared by the end-to-end tests."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# The end-to-end tests build the same programs several times (and in CLI subprocesses): a
# per-session persistent compilation cache turns the repeats into cache hits.
import tempfile  # pylint: disable=wrong-import-position
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="eercl_jax_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# The reference tests restate their authors' optimisers with torch.optim, which imports
# torch._dynamo; in a process that has imported TensorFlow (clu's metric writers do, in every
# run) that import segfaults (torch 2.14 with TF 2.21); imported first, both load.
try:
  import torch._dynamo  # pylint: disable=wrong-import-position,unused-import
except ImportError:   # torch is a test-only dependency of the reference tests
  pass

import pytest  # pylint: disable=wrong-import-position
from absl import flags  # pylint: disable=wrong-import-position

from eercl_jax import config_defaults  # pylint: disable=wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# grain reads its absl flags when it starts data workers; tests run outside an absl program
# (eercl_jax.tools.cli.grain_workers_ready does the same for the argparse commands).
if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()


# The fast tier is `pytest -m "not slow"`: every test but the end-to-end runs, under 3 minutes on
# two cores. A test is slow when it trains (a source run, an adaptation, a CLI run, a subprocess
# grid) or compiles a large program; those that use the shared trained runs below are marked
# here, the others by their own `@pytest.mark.slow`.
SLOW_FIXTURES = ("source_run", "runs", "uninterrupted")


def pytest_collection_modifyitems(items):
  for item in items:
    if any(name in SLOW_FIXTURES for name in getattr(item, "fixturenames", ())):
      item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A folder holding `data/` with the dry run's synthetic set in the real list layout; the
  configs' relative paths resolve against it (tests chdir into it)."""
  from eercl_jax.data.datasets import synthetic  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("fer")
  synthetic.ensure_generated(str(root / "data"), **config_defaults.RUNLOCAL_SYNTHETIC)
  return root


@pytest.fixture(scope="session")
def source_run(data_dir, tmp_path_factory):
  """A briefly trained tiny source model (its workdir), shared by the tests that only read it."""
  from configs import demo_source  # pylint: disable=import-outside-toplevel
  from eercl_jax import train_source  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path_factory.mktemp("source"))
  old = os.getcwd()
  os.chdir(data_dir)
  try:
    c = demo_source.get_config("runlocal")
    c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = 4, 2, 4, 4
    train_source.train_and_evaluate(c, workdir)
  finally:
    os.chdir(old)
  return workdir


def assert_trees_close(got, want, rtol=1e-4, atol=1e-5, what="", scale_tol=3e-5):
  """Leaf-by-leaf allclose of two pytrees, naming the leaf at fault. float32 sums through a
  stack of batch norms differ by a few ulps of the tensor's largest entries, so the absolute
  tolerance grows with the tensor's scale (a wrong formula moves entries by tens of percent)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  def check(path, g, w):
    w = np.asarray(w, np.float64)
    tol = max(atol, scale_tol * float(np.max(np.abs(w), initial=0.0)))
    np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=rtol, atol=tol,
                               err_msg=f"{what}{jax.tree_util.keystr(path)}")
  jax.tree_util.tree_map_with_path(check, got, want)


def random_variables(model, rs, size):
  """Random variables of `model`'s shapes for `size`-px images, filled on the host (compiling
  the Flax initialisers would cost more than the tests that use this). BN running statistics are
  away from their (0, 1) init, so the momentum update is visible."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, size, size, 3)), train=False))

  def fill(path, x):
    name = jax.tree_util.keystr(path)
    if "batch_stats" in name:
      v = rs.uniform(0.5, 1.5, x.shape) if name.endswith("['var']") else 0.3 * rs.randn(*x.shape)
    elif name.endswith("['scale']"):
      v = 1.0 + 0.1 * rs.randn(*x.shape)
    elif len(x.shape) >= 2:            # kernels, embeddings, classifier directions
      v = rs.randn(*x.shape) / np.sqrt(np.prod(x.shape[:-1]))
    elif name.endswith("['g']"):       # classifier norms: positive
      v = rs.uniform(1.0, 3.0, x.shape)
    else:                              # biases
      v = 0.1 * rs.randn(*x.shape)
    return jnp.asarray(v, jnp.float32)

  return dict(jax.tree_util.tree_map_with_path(fill, dict(shapes)))


def torch_sgd(params, grads, bufs, *, lr: float, optim, group_of, frozen=()):
  """One step of PyTorch's SGD (coupled weight decay, Nesterov momentum) per parameter group,
  on float64 numpy trees {scope: tree}: d = g + wd p; buf = mu buf + d; d += mu buf; p -= lr_g d,
  lr_g = lr * optim.lr_mult[group]. A group in `frozen` has no gradient in PyTorch: neither an
  update nor weight decay. Returns (new params, new momentum buffers)."""
  import jax  # pylint: disable=import-outside-toplevel
  new_params, new_bufs = {}, {}
  for scope in params:
    group = group_of[scope]
    if group in frozen:
      new_params[scope], new_bufs[scope] = params[scope], bufs[scope]
      continue

    def sgd(p, g, buf, lr=lr * optim.lr_mult[group]):
      d = g + optim.weight_decay * p
      buf = optim.momentum * buf + d
      return p - lr * (d + optim.momentum * buf), buf

    out = jax.tree_util.tree_map(sgd, params[scope], grads[scope], bufs[scope])
    is_pair = lambda t: isinstance(t, tuple)
    new_params[scope] = jax.tree_util.tree_map(lambda t: t[0], out, is_leaf=is_pair)
    new_bufs[scope] = jax.tree_util.tree_map(lambda t: t[1], out, is_leaf=is_pair)
  return new_params, new_bufs
