"""Settings of `python -m eercl_jax.bench`: what it measures (`bench`) and the two stage configs
it measures with (`source`, `adapt`; any field can be overridden, e.g.
--config.adapt.batch_size=128 or --config.bench.steps=20).

  --config=configs/bench.py                   'cpu': the demo's tiny ViT at 32 px, float32
  --config=configs/bench.py:vit_b16_224       the real job: ViT-B/16 at 224, bfloat16
  --config=configs/bench.py:gpu_check         vit_b16_224 plus a short source + adaptation run
  --config=configs/bench.py:configs/adapt_expw.py   a training config (its stage only), with the
                                              vit_b16_224 settings
  --config=configs/bench.py:gpu_check,runlocal      any of them as a CPU-sized dry run: the
                                              stage configs shrunk by config_defaults.runlocal
                                              and small sizes (the suite runs gpu_check's so)

--config.bench.compile_only=True compiles the steps without running them (their device memory
and FLOPs); --config.bench.compile_for=benchmarks/gpu_targets/<gpu>.txtpb compiles them for that
GPU on a machine without one (jax's CUDA plugin: requirements-gpu.txt; README: Device memory).

Random weights; the synthetic images the bench writes stand in for the data (a step's cost does
not depend on them).
"""
import importlib.util
import os

import ml_collections

from configs import adapt, demo_adapt, demo_source, source
from eercl_jax import config_defaults

PRESETS = ("cpu", "vit_b16_224", "gpu_check")
SECTIONS = ("step", "refresh", "pipeline", "views", "knn", "smoke")


def _settings(preset: str) -> ml_collections.ConfigDict:
  """What the bench measures (eercl_jax/benchmarks.py describes each section)."""
  # Lists are comma-separated text, so that --config.bench.sections=step,knn works.
  cpu = dict(
      sections="step,refresh,pipeline,views,knn",
      stages="source,adapt",         # of the step section
      steps=5, repeats=3,            # timed steps per repeat, timed repeats (step, refresh, knn)
      compile_only=False,            # step: compile only - memory and FLOPs, no timing
      compile_for="",                # step: compile only, for the GPU this XLA GPU target
                                     # config describes (benchmarks/gpu_targets/*.txtpb)
      bank_rows=10_000,              # target images N of the adaptation step
      workers="0,1,2",               # grain worker counts of the pipeline ('auto': the host's)
      image_px=400,                  # side of the synthetic JPEGs
      pipeline_images=1024, pipeline_batch=64,
      pipeline_size="256,224",       # resize,crop of the pipeline and views sections
      refresh_images=512,            # target list length of the refresh section
      views_images=50,               # images per figure of the views section
      knn_sizes="10000,100000,1000000", knn_dim=256,
      smoke_steps=0,                 # steps of each smoke run (0: none)
      peak_tflops=0.0)               # per device, for the MFU (0: the device's datasheet peak)
  if preset == "cpu":
    return ml_collections.ConfigDict(cpu)
  real = dict(cpu, steps=10, repeats=5, bank_rows=91_793, workers="0,auto",
              pipeline_images=2048, refresh_images=10_000, views_images=200)
  if preset == "vit_b16_224":
    return ml_collections.ConfigDict(real)
  return ml_collections.ConfigDict(dict(   # gpu_check: within 8 minutes on one GPU
      real, sections=",".join(SECTIONS), steps=10, repeats=3, workers="auto",
      pipeline_images=1024, refresh_images=4096, views_images=100, knn_sizes="100000,1000000",
      smoke_steps=10))


def _real(stage):
  """A paper config at a throughput batch for one GPU (the method's global batch is 64)."""
  stage.model.init_from = ""
  stage.batch_size = 256
  if stage.stage == "adapt":
    stage.adapt.refresh_batch_size = 512
  return stage


def _load(path: str):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _runlocal(c):
  """The dry run: every stage config shrunk, the measured sizes small (about a minute)."""
  for stage in ("source", "adapt"):
    if stage in c:
      config_defaults.runlocal(c[stage])
  c.bench.update(steps=2, repeats=2, bank_rows=1000, workers="0", image_px=48,
                 pipeline_images=32, pipeline_batch=16, pipeline_size="36,32",
                 refresh_images=64, views_images=4, knn_sizes="1000", knn_dim=16,
                 smoke_steps=min(c.bench.smoke_steps, 2))
  return c


def get_config(arg: str = "cpu"):
  first, *flags = [a.strip() for a in arg.split(",")]
  unknown = [f for f in flags if f != "runlocal"]
  if unknown:
    raise ValueError(f"configs/bench.py: unknown argument(s) {unknown}; expected 'runlocal'")
  c = ml_collections.ConfigDict()
  if first.endswith(".py"):              # a training config: its own stage only
    stage = _load(first)
    stage.model.init_from = ""
    for key in config_defaults.unset_from_source(stage):   # no source run: its defaults
      group, field = key.split(".")
      stage[group][field] = source.get_config()[group][field]
    c.bench = _settings("vit_b16_224")
    c.bench.stages = stage.stage
    c[stage.stage] = stage
  elif first in PRESETS:
    c.bench = _settings(first)
    if first == "cpu":
      c.source, c.adapt = demo_source.get_config(), demo_adapt.get_config()
    else:
      c.source, c.adapt = _real(source.get_config()), _real(adapt.get_config("target=bench"))
    for key in config_defaults.FROM_SOURCE:   # the adaptation of that source model
      group, field = key.split(".")
      c.adapt[group][field] = c.source[group][field]
  else:
    raise ValueError(f"configs/bench.py: unknown preset {first!r}; expected one of {PRESETS} "
                     "or a training config file")
  return _runlocal(c) if flags else c
