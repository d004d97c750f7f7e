"""Every program a GPU run compiles, lowered for CUDA on this CPU-only machine (`jax.export` with
platforms=("cuda",), which needs no GPU): the source step, the adaptation step, the eval forward
(evaluations, predictions and the refresh's embedding) and the refresh's bank writes and
clustering - the stages' own builds, for the ViT and the ResNet in bfloat16 (the paper configs'
dtype), on one device and on the 8 fake CPU devices of the tests (the mesh's shardings; there
with remat and the row-sharded banks' shard_map, the multi-GPU settings). A lowering that only
fails for CUDA - a primitive without a CUDA rule, a GPU custom call that has no compatibility
guarantee - then fails in CI instead of on the first GPU day.

What this cannot see: XLA's GPU compilation (fusion, layouts, memory, cuDNN autotuning) runs on a
GPU only; an op whose lowering asks the GPU for something (cuDNN's fused attention: "cuDNN is
not detected") cannot be lowered here at all, nor can a host callback (jax.debug.print) be
exported for any platform.
"""
import jax
import numpy as np
import pytest
from jax import export

from configs import demo_adapt, demo_source
from eercl_jax import parallel, train_adapt, train_source
from eercl_jax.methods import eercl as eercl_method
from eercl_jax.models import eercl, registry
from tests.conftest import random_variables

N = 100   # target images: bank rows (padded to a multiple of the devices when sharded)


def lower_for_cuda(jitted, *args, **kwargs) -> export.Exported:
  """`jitted` lowered for CUDA at `args` (arrays or ShapeDtypeStructs, with their shardings)."""
  exported = export.export(jitted, platforms=("cuda",))(*args, **kwargs)
  assert exported.platforms == ("cuda",)
  return exported


def spec(x) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)


def _config(get_config, backbone: str, multi_device: bool):
  c = get_config("runlocal")
  c.model.backbone = backbone
  c.model.size = registry.get(backbone).test_size
  c.model.dtype = "bfloat16"              # configs/source.py, configs/adapt.py
  c.model.remat = multi_device
  if c.stage == "adapt":
    c.adapt.shard_banks = multi_device
  return c


# ~8 s a case (the stages' builds run their initialisers eagerly): the fast tier lowers the ViT
# on 8 devices (shardings, remat, sharded banks), the slow tier the other three.
_slow = pytest.mark.slow


@pytest.mark.parametrize("backbone,devices", [
    ("vit", 8), pytest.param("vit", 1, marks=_slow), pytest.param("resnet", 1, marks=_slow),
    pytest.param("resnet", 8, marks=_slow)])
def test_every_gpu_program_lowers_for_cuda(backbone, devices):
  assert jax.device_count() >= devices, "tests/conftest.py asks XLA for 8 CPU devices"
  mesh = parallel.create_mesh(jax.devices()[:devices])
  data = parallel.batch_sharding(mesh)
  source_config = _config(demo_source.get_config, backbone, devices > 1)
  adapt_config = _config(demo_adapt.get_config, backbone, devices > 1)
  crop = source_config.data.crop
  images = lambda n: jax.ShapeDtypeStruct((n, crop, crop, 3), np.uint8, sharding=data)
  rows = lambda n, dtype=np.int32: jax.ShapeDtypeStruct((n,), dtype, sharding=data)
  variables = random_variables(eercl.create_model(source_config.model),
                               np.random.RandomState(0), crop)

  source = train_source.build(source_config, mesh, variables)
  b = source_config.batch_size
  exported = lower_for_cuda(source.step, jax.tree_util.tree_map(spec, source.state),
                            {"image": images(b), "label": rows(b)})
  assert exported.nr_devices == devices

  adapt = train_adapt.build(adapt_config, mesh, variables, N)
  b = adapt_config.batch_size
  batch = {"weak": images(b), "strong1": images(b), "strong2": images(b), "label": rows(b),
           "index": rows(b)}
  exported = lower_for_cuda(adapt.step, jax.tree_util.tree_map(spec, adapt.state), batch)
  assert exported.nr_devices == devices

  # The bank refresh (methods/eercl.py) and every evaluation: the eval forward on a
  # refresh batch, the writes of its rows into the banks (with and without the teacher's, as at
  # step 0 and after), then the clustering. Bank shardings as the state's.
  r = adapt_config.adapt.refresh_batch_size
  online = {"params": adapt.state.params, "batch_stats": adapt.state.batch_stats}
  for forward in (adapt.evaluator.logits, adapt.evaluator.embed, adapt.evaluator.features):
    lower_for_cuda(jax.jit(forward), jax.tree_util.tree_map(spec, online), images(r))
  banks = jax.tree_util.tree_map(spec, adapt.state.banks)
  feat = jax.ShapeDtypeStruct((r, adapt_config.model.feat_dim), np.float32, sharding=data)
  score = jax.ShapeDtypeStruct((r, adapt_config.model.num_classes), np.float32, sharding=data)
  for teacher in (True, False):
    lower_for_cuda(eercl_method.write_refresh, banks, rows(r), rows(r, np.bool_), feat, score,
                   rows(r), feat, score, teacher=teacher)
  lower_for_cuda(eercl_method.cluster, banks,
                 threshold=adapt_config.adapt.cluster_min_size, num_images=N)


def test_lowering_for_cuda_fails_on_an_op_without_a_cuda_rule():
  """The check above is not vacuous: the Schur decomposition has a CPU lowering only, so a
  program using it runs here and lowers for the CPU, but not for CUDA."""
  f = jax.jit(lambda a: jax.scipy.linalg.schur(a)[0])
  a = np.eye(4, dtype=np.float32)
  np.testing.assert_allclose(f(a), a)
  export.export(f, platforms=("cpu",))(a)
  with pytest.raises(NotImplementedError, match="not found for platform cuda"):
    lower_for_cuda(f, a)
