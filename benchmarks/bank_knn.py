"""Benchmark of the AaD bank kNN: replicated bank on one device vs row-sharded bank on all devices.

  python benchmarks/bank_knn.py --sizes 10000 100000 1000000
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/bank_knn.py   # CPU mesh

Per size N: bank memory per device (feature bank N x D fp32 + score bank N x C fp32) and the
median wall time (jit, warm, block_until_ready) of
  knn           top-k of a (B x N) similarity matrix,
  aad_probs     top-k, self dropped, gather of the k-1 neighbour scores (the training step's
                AaD lookup: k = adapt.aad_neighbours + 1 = 5),
  aad_nobarrier the same without the optimisation barrier (the CPU fusion pathology of
                docs/toolchain.md),
  sharded_knn / sharded_aad_probs over every device at hand.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from eercl_jax import banks as bk  # noqa: E402
from eercl_jax.losses import l2_normalize  # noqa: E402


def _median_time(fn, args, iters, warmup=2):
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _aad_nobarrier(q, feat, score, k):
  # The literal transcription: top-k indices straight into the gather.
  _, idx = jax.lax.top_k(jnp.matmul(q, feat.T, precision=jax.lax.Precision.HIGHEST), k + 1)
  return jnp.take(score, idx[:, 1:], axis=0)


def _mib(nbytes):
  return f"{nbytes / 2**20:9.1f} MiB"


def run(n, dim, batch, k, classes, iters, nobarrier_max):
  devices = jax.devices()
  key = jax.random.PRNGKey(0)
  kf, ks, kq = jax.random.split(key, 3)
  dev0 = devices[0]
  feat = jax.device_put(l2_normalize(jax.random.normal(kf, (n, dim), jnp.float32)), dev0)
  score = jax.device_put(jax.nn.softmax(jax.random.normal(ks, (n, classes), jnp.float32)), dev0)
  q = jax.device_put(feat[jax.random.randint(kq, (batch,), 0, n)], dev0)  # queries are bank rows
  row_bytes = (dim + classes) * 4
  print(f"\nN={n:,}  D={dim}  B={batch}  k={k}  C={classes}  devices={len(devices)} "
        f"({devices[0].platform})")
  print(f"  single device : bank memory/device {_mib(n * row_bytes)}")
  t = _median_time(jax.jit(bk.knn, static_argnums=2), (q, feat, k), iters)
  print(f"    knn                {t * 1e3:9.2f} ms")
  t = _median_time(jax.jit(bk.aad_neighbour_probs, static_argnums=3), (q, feat, score, k - 1),
                     iters)
  print(f"    aad_probs          {t * 1e3:9.2f} ms")
  if n <= nobarrier_max:
    t = _median_time(jax.jit(_aad_nobarrier, static_argnums=3), (q, feat, score, k - 1),
                     max(1, min(iters, 3)), warmup=1)
    print(f"    aad_nobarrier      {t * 1e3:9.2f} ms")
  del feat, score

  s = len(devices)
  if s == 1:
    print("  sharded       : skipped (one device)")
    return
  mesh = jax.make_mesh((s,), ("data",))
  npad = bk.pad_rows(n, s)
  rows = NamedSharding(mesh, P("data"))
  featp = jax.device_put(bk.pad_bank(l2_normalize(jax.random.normal(kf, (n, dim))), s), rows)
  scorep = jax.device_put(bk.pad_bank(jax.nn.softmax(jax.random.normal(ks, (n, classes))), s),
                          rows)
  qr = jax.device_put(q, NamedSharding(mesh, P()))
  print(f"  sharded x{s:<3d}  : bank memory/device {_mib(npad // s * row_bytes)}")
  f = jax.jit(lambda a, b: bk.sharded_knn(a, b, k, mesh, num_valid=n))
  t = _median_time(f, (qr, featp), iters)
  print(f"    sharded_knn        {t * 1e3:9.2f} ms")
  f = jax.jit(lambda a, b, c: bk.sharded_aad_neighbour_probs(a, b, c, k - 1, mesh, num_valid=n))
  t = _median_time(f, (qr, featp, scorep), iters)
  print(f"    sharded_aad_probs  {t * 1e3:9.2f} ms")


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
  ap.add_argument("--dim", type=int, default=256)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--k", type=int, default=5)
  ap.add_argument("--classes", type=int, default=7)
  ap.add_argument("--iters", type=int, default=20)
  ap.add_argument("--nobarrier-max", type=int, default=200_000,
                  help="skip the no-barrier variant above this N (it can take seconds per call)")
  args = ap.parse_args()
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} devices")
  for n in args.sizes:
    run(n, args.dim, args.batch, args.k, args.classes, args.iters, args.nobarrier_max)


if __name__ == "__main__":
  main()
