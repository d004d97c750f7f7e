"""Throughput of the jitted training steps (a benchmark, not a test): images/s, step time,
achieved FLOP/s from XLA's cost analysis and MFU against a peak you give.

  python benchmarks/train_step.py --stage=source --size=B/16 --image_size=224 \
      --batch=256 --dtype=bfloat16 --peak_tflops=790          # one H200, bf16 dense peak
  python benchmarks/train_step.py --stage=adapt --size=B/16 --batch=64 --bank_rows=90000
  python benchmarks/train_step.py --size=mu/8 --image_size=32 --batch=64   # CPU smoke run

Random weights and random uint8 images: the step's cost does not depend on the data.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from eercl_jax import config_defaults, optim, parallel, train_adapt, train_source  # noqa: E402
from eercl_jax.models import eercl  # noqa: E402


def _config(args):
  c = (config_defaults.source_config() if args.stage == "source"
       else config_defaults.adapt_config("bench"))
  c.model.backbone, c.model.size, c.model.dtype = args.backbone, args.size, args.dtype
  c.model.remat = args.remat
  c.data.crop = c.data.resize = args.image_size
  c.batch_size = args.batch
  c.bn_group_size = min(c.bn_group_size, args.batch)
  return c


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)) if cost else 0.0


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--stage", choices=["source", "adapt"], default="source")
  p.add_argument("--backbone", default="vit", help="a registered backbone: vit | resnet")
  p.add_argument("--size", default=None, help="its named size (default: the backbone's)")
  p.add_argument("--remat", action="store_true", help="rematerialise backbone blocks")
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--batch", type=int, default=64, help="global images per step")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--bank_rows", type=int, default=10000, help="adapt: target images N")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--peak_tflops", type=float, default=0.0, help="device peak for MFU (per device)")
  args = p.parse_args()

  config = _config(args)
  mesh = parallel.create_mesh()
  model = eercl.create_model(config.model)
  rng = np.random.default_rng(0)
  image = lambda: rng.integers(0, 256, (args.batch, args.image_size, args.image_size, 3), np.uint8)
  if args.stage == "source":
    tx = optim.for_model(config)
    state = parallel.replicate(train_source.create_state(config, model, tx,
                                                         jax.random.PRNGKey(0)), mesh)
    step = train_source.compile_train_step(config, model, tx, mesh)
    batch = {"image": image(), "label": rng.integers(0, 7, args.batch, np.int32)}
    images_per_step = args.batch
  else:
    tx = optim.for_model(config, frozen=("classifier",))
    variables = eercl.init_variables(model, jax.random.PRNGKey(0), args.image_size)
    state = train_adapt.create_state(config, model, tx, variables, args.bank_rows, mesh)
    step = train_adapt.compile_adapt_step(config, model, tx, mesh, state, args.bank_rows)
    batch = {"weak": image(), "strong1": image(), "strong2": image(),
             "label": rng.integers(0, 7, args.batch, np.int32),
             "index": rng.permutation(args.bank_rows)[:args.batch].astype(np.int32)}
    images_per_step = 3 * args.batch  # three views through teacher and online network
  batch = parallel.shard_batch(batch, mesh)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  flops = _flops(compiled)
  state, metrics = step(state, batch)  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  dt = float(np.median(times))
  n = mesh.devices.size
  print(f"stage={args.stage} {args.backbone}={model.size}@{args.image_size} dtype={args.dtype} "
        f"batch={args.batch} devices={n} ({jax.devices()[0].platform})")
  print(f"compile {compile_s:.1f} s | step {dt * 1e3:.1f} ms (median of {args.steps}) | "
        f"{images_per_step / dt:.1f} img/s ({images_per_step / dt / n:.1f} per device)")
  if flops:
    tflops = flops / dt / 1e12
    line = f"XLA flops/step {flops / 1e9:.1f} GFLOP | achieved {tflops:.2f} TFLOP/s"
    if args.peak_tflops:
      line += f" | MFU {100 * tflops / (args.peak_tflops * n):.1f}%"
    print(line)


if __name__ == "__main__":
  main()
