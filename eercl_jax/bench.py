"""One benchmark command: what a run's stages cost on the devices and the host at hand.

  python -m eercl_jax.bench                                  # CPU-sized, about a minute
  python -m eercl_jax.bench --only=step,knn                  # some sections
  python -m eercl_jax.bench --preset=vit_b16_224             # ViT-B/16 at 224, bfloat16
  python -m eercl_jax.bench --config=configs/adapt_expw.py --config.batch_size=128
  bash benchmarks/gpu_check.sh                               # one GPU, within 8 minutes

Prints one JSON line per figure on stdout: {"name", "value", "unit", ...settings}; a section
that cannot run prints {"name", "skipped": reason}. Log lines go to stderr. Sections (`--only`):

  step      the jitted source step and adaptation step (random weights, random uint8 images):
            images/s, step time (median and spread over `--repeats` timed runs of `--steps`
            steps each, after compilation), XLA's FLOPs per step from
            `jitted.lower(...).compile().cost_analysis()`, achieved TFLOP/s, and MFU against the
            device's bfloat16 dense peak (`PEAK_TFLOPS`, or `--peak_tflops`). An adaptation
            "image" is one target image in its three views (teacher forward + online forward and
            backward of each).
  refresh   `train_adapt.refresh_banks`, the adaptation's full pass over the target list, over
            `--refresh_images` synthetic JPEGs with the config's data settings: images/s.
  pipeline  the training input pipeline alone (`pipelines.train_dataset`), from
            `--image_px`-pixel JPEGs: one weak view (source stage) and weak + two strong views
            (adaptation), per grain worker count (`--workers`); for folder data, and for packed
            data when `eercl_jax.data.pack` exists (lossless and resized).
  views     one image's cost on one thread: JPEG decode, weak, test and strong views.
  knn       the AaD bank lookup (`banks.aad_neighbour_probs`, top-k + gather) and bank memory
            for N = `--knn_sizes` rows, replicated on one device and sharded over all devices.
  smoke     a short source + adaptation run of the config's model on synthetic data
            (`--smoke_steps` > 0; on in the gpu_check preset).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

from absl import app, flags, logging
from ml_collections import config_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_CONFIG = os.path.join(REPO, "configs", "bench.py")
SECTIONS = ("step", "refresh", "pipeline", "views", "knn", "smoke")

# bfloat16 dense peaks in TFLOP/s per device, from the vendors' datasheets (substring of
# `jax.devices()[0].device_kind` -> peak). Large matmuls reach less: ~790 measured on an H200
# (docs/toolchain.md#vit-b16-flops-and-mfu); pass --peak_tflops to measure MFU against that.
PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0))

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file (default: configs/bench.py, preset 'cpu'); training configs "
    "work too.", lock_config=True)
_PRESET = flags.DEFINE_enum("preset", None, ["cpu", "vit_b16_224", "gpu_check"],
                            "Short for --config=configs/bench.py:NAME, and the preset's flag "
                            "defaults below.")
_ONLY = flags.DEFINE_list("only", None, f"Sections to run, of {','.join(SECTIONS)} (default: "
                          "all but smoke; smoke too in the gpu_check preset).")
_STAGES = flags.DEFINE_list("stages", ["source", "adapt"], "Stages of the step section.")
_STEPS = flags.DEFINE_integer("steps", None, "Timed steps per repeat (step section).")
_REPEATS = flags.DEFINE_integer("repeats", None, "Timed repeats (step, refresh, knn).")
_BANK_ROWS = flags.DEFINE_integer("bank_rows", None, "Target images N of the adaptation step.")
_PEAK = flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s per device for MFU (default: the "
                           "device's bfloat16 dense peak from the table, if known).")
_WORKERS = flags.DEFINE_list("workers", None, "grain worker counts for the pipeline section; "
                             "'auto' = the host-following default (data/host.py).")
_IMAGE_PX = flags.DEFINE_integer("image_px", None, "Side of the synthetic JPEGs.")
_PIPE_IMAGES = flags.DEFINE_integer("pipeline_images", None, "Images timed per pipeline figure.")
_PIPE_BATCH = flags.DEFINE_integer("pipeline_batch", None, "Batch of the pipeline section.")
_PIPE_SIZE = flags.DEFINE_list("pipeline_size", None, "resize,crop of the pipeline and views "
                               "sections (default: the config's data.resize, data.crop).")
_REFRESH_IMAGES = flags.DEFINE_integer("refresh_images", None, "Target list length (refresh).")
_VIEWS_IMAGES = flags.DEFINE_integer("views_images", None, "Images per figure (views).")
_KNN_SIZES = flags.DEFINE_list("knn_sizes", None, "Bank rows N of the knn section.")
_KNN_DIM = flags.DEFINE_integer("knn_dim", None, "Feature width of the knn section's bank.")
_SMOKE_STEPS = flags.DEFINE_integer("smoke_steps", None, "Steps of each smoke run (0: none).")

# Flag defaults per preset (a flag given on the command line wins).
PRESET_FLAGS = {
    "cpu": dict(only=["step", "refresh", "pipeline", "views", "knn"], steps=5, repeats=3,
                bank_rows=10_000, workers=["0", "1", "2"], image_px=400, pipeline_images=1024,
                pipeline_batch=64, pipeline_size=["256", "224"], refresh_images=512,
                views_images=50, knn_sizes=["10000", "100000", "1000000"], knn_dim=256,
                smoke_steps=0),
    "vit_b16_224": dict(only=["step", "refresh", "pipeline", "views", "knn"], steps=10,
                        repeats=5, bank_rows=91_793, workers=["0", "auto"], image_px=400,
                        pipeline_images=2048, pipeline_batch=64, pipeline_size=None,
                        refresh_images=10_000, views_images=200,
                        knn_sizes=["10000", "100000", "1000000"], knn_dim=256, smoke_steps=0),
}
PRESET_FLAGS["gpu_check"] = dict(PRESET_FLAGS["vit_b16_224"], only=list(SECTIONS), steps=10,
                                 repeats=3, workers=["auto"], pipeline_images=1024,
                                 refresh_images=4096, views_images=100,
                                 knn_sizes=["100000", "1000000"], smoke_steps=10)


class Skip(Exception):
  """A figure that cannot be measured here; the reason is printed in its place."""


def emit(name: str, value: float, unit: str, **settings) -> None:
  print(json.dumps({"name": name, "value": float(value), "unit": unit, **settings}), flush=True)


def skip(name: str, reason: str) -> None:
  print(json.dumps({"name": name, "skipped": reason}), flush=True)


def _opt(flag, preset: dict, key: str):
  return flag.value if flag.present else preset[key]


# ------------------------------------------------------------------------------- settings

def _device_settings() -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  d = jax.devices()[0]
  return {"platform": d.platform, "device": d.device_kind, "devices": jax.device_count()}


def peak_tflops(device_kind: str, override: float | None) -> tuple[float | None, str]:
  """(peak TFLOP/s per device, where it comes from) or (None, why not)."""
  if override:
    return float(override), "--peak_tflops"
  for key, peak in PEAK_TFLOPS:
    if key.lower() in device_kind.lower():
      return peak, f"datasheet bfloat16 dense ({key})"
  return None, f"no peak known for {device_kind!r}: pass --peak_tflops"


def stage_configs(base) -> tuple[Any, Any]:
  """(source config, adaptation config) sharing `base`'s model, data sizes and batches."""
  # pylint: disable=import-outside-toplevel
  import ml_collections
  from eercl_jax import config_defaults
  src = config_defaults.source_config()
  ada = config_defaults.adapt_config(target="bench")
  base = ml_collections.ConfigDict(base.to_dict())
  base.model.init_from = ""
  for c in (src, ada):
    c.model = ml_collections.ConfigDict(base.model.to_dict())
    for key in ("resize", "crop", "mean", "std", "num_workers", "prefetch"):
      c.data[key] = base.data.get(key, c.data[key])
    for key in ("batch_size", "bn_group_size", "eval_batch_size", "seed"):
      if key in base:
        c[key] = base[key]
    c.bn_group_size = min(c.bn_group_size, c.batch_size)
  if "adapt" in base:
    ada.adapt = ml_collections.ConfigDict(base.adapt.to_dict())
  for key in ("virtual_devices", "num_steps"):
    if key in base and base.stage == "adapt":
      ada[key] = base[key]
  return src, ada


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)) if cost else 0.0


def _timed(fn: Callable[[], Any], repeats: int) -> list[float]:
  """Wall times of `repeats` calls of fn (which blocks until its work is done)."""
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


# ----------------------------------------------------------------------------------- step

def bench_step(stage: str, config, steps: int, repeats: int, bank_rows: int,
               peak: tuple[float | None, str], dev: dict) -> None:
  # pylint: disable=import-outside-toplevel
  import jax
  import numpy as np
  from eercl_jax import optim, parallel, train_adapt, train_source
  from eercl_jax.models import eercl
  mesh = parallel.create_mesh()
  model = eercl.create_model(config.model)
  b, crop = config.batch_size, config.data.crop
  rng = np.random.default_rng(0)
  image = lambda: rng.integers(0, 256, (b, crop, crop, 3), np.uint8)
  if stage == "source":
    tx = optim.for_model(config)
    state = parallel.replicate(
        train_source.create_state(config, model, tx, jax.random.PRNGKey(0)), mesh)
    step = train_source.compile_train_step(config, model, tx, mesh)
    batch = {"image": image(), "label": rng.integers(0, 7, b, np.int32)}
  else:
    tx = optim.for_model(config, frozen=("classifier",))
    variables = eercl.init_variables(model, jax.random.PRNGKey(0), crop)
    state = train_adapt.create_state(config, model, tx, variables, bank_rows, mesh)
    step = train_adapt.compile_adapt_step(config, model, tx, mesh, state, bank_rows)
    batch = {"weak": image(), "strong1": image(), "strong2": image(),
             "label": rng.integers(0, 7, b, np.int32),
             "index": rng.permutation(bank_rows)[:b].astype(np.int32)}
  batch = parallel.shard_batch(batch, mesh)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  flops = _flops(compiled)
  holder = {"state": state}

  def run_steps(n):
    s = holder["state"]
    for _ in range(n):
      s, metrics = compiled(s, batch)
    jax.block_until_ready((s, metrics))
    holder["state"] = s
  run_steps(1)   # warm-up: the first call allocates and transfers
  times = [t / steps for t in _timed(lambda: run_steps(steps), repeats)]
  dt = statistics.median(times)
  n = dev["devices"]
  settings = dict(section="step", stage=stage, backbone=config.model.backbone,
                  size=model.size, crop=crop, dtype=config.model.dtype, batch=b,
                  steps=steps, repeats=repeats, **dev)
  if stage == "adapt":
    settings.update(bank_rows=bank_rows, views_per_image=3)
  name = f"step/{stage}"
  emit(f"{name}/images_per_s", b / dt, "images/s", per_device=b / dt / n, **settings)
  emit(f"{name}/step_time_ms", dt * 1e3, "ms", min_ms=min(times) * 1e3,
       max_ms=max(times) * 1e3, spread=(max(times) - min(times)) / dt, **settings)
  emit(f"{name}/compile_s", compile_s, "s", **settings)
  if flops <= 0:
    skip(f"{name}/flops", "XLA's cost analysis gave no FLOPs on this backend")
    return
  # The cost analysis of an SPMD program counts one device's share.
  total = flops * n
  emit(f"{name}/gflop_per_step", total / 1e9, "GFLOP", **settings)
  emit(f"{name}/gflop_per_image", total / b / 1e9, "GFLOP", **settings)
  achieved = total / dt / 1e12
  emit(f"{name}/tflops", achieved, "TFLOP/s", per_device=achieved / n, **settings)
  peak_value, source = peak
  if peak_value is None:
    skip(f"{name}/mfu", source)
  else:
    emit(f"{name}/mfu", achieved / (peak_value * n), "fraction", peak_tflops=peak_value,
         peak_source=source, **settings)


# ------------------------------------------------------------------------ synthetic images

def write_images(root: str, count: int, px: int, distinct: int = 16) -> str:
  """`count` JPEG files of `px` x `px` synthetic faces under `root/fer` and their list
  (labels cycle through the classes); `distinct` faces are drawn and their bytes reused, since
  decoding cost does not depend on which face a file holds. Returns the list path."""
  # pylint: disable=import-outside-toplevel
  import io
  import numpy as np
  from eercl_jax.data import synthetic
  image_root = os.path.join(root, "fer")
  os.makedirs(os.path.join(image_root, "bench"), exist_ok=True)
  blobs = []
  for i in range(min(distinct, count)):
    buf = io.BytesIO()
    img = synthetic.render(i % len(synthetic.CLASSES), synthetic.SOURCE, px,
                           np.random.default_rng([7, i]))
    img.save(buf, format="JPEG", quality=90)
    blobs.append(buf.getvalue())
  lines = []
  for i in range(count):
    rel = f"bench/{i:06d}.jpg"
    with open(os.path.join(image_root, rel), "wb") as f:
      f.write(blobs[i % len(blobs)])
    lines.append(f"{rel} {i % len(blobs) % len(synthetic.CLASSES)}\n")
  list_path = os.path.join(root, f"bench_{count}_{px}.txt")
  with open(list_path, "w") as f:
    f.writelines(lines)
  return list_path


def read_bench_list(list_path: str, class_names):
  from eercl_jax.data import lists  # pylint: disable=import-outside-toplevel
  return lists.read_list(list_path, os.path.join(os.path.dirname(list_path), "fer"),
                         class_names, check_images="none")


# -------------------------------------------------------------------------------- refresh

def bench_refresh(config, list_path: str, repeats: int, dev: dict, tmp: str) -> None:
  """The full-list refresh pass, before and after packing: read through the input pipeline
  (JPEG decode + view on the host), then from the packed list resident in host RAM (host view;
  device view) and in device memory (device view). One line each, and the speed-ups."""
  # pylint: disable=import-outside-toplevel
  import dataclasses
  import jax
  from eercl_jax import optim, parallel, train_adapt
  from eercl_jax.data import host, pack, resident as resident_lib
  from eercl_jax.models import eercl
  mesh = parallel.create_mesh()
  class_names = tuple(config.data.class_names)
  fl = read_bench_list(list_path, class_names)
  model = eercl.create_model(config.model)
  tx = optim.for_model(config, frozen=("classifier",))
  variables = eercl.init_variables(model, jax.random.PRNGKey(0), config.data.crop)
  embed = train_adapt._make_embed(model, config)  # pylint: disable=protected-access
  t0 = time.perf_counter()
  packed_list = dataclasses.replace(fl, packed_dir=pack.pack_list(
      list_path, fl.image_root, os.path.join(tmp, "refresh_packed"), class_names,
      resize=config.data.resize, overwrite=True))
  pack_s = time.perf_counter() - t0
  variants = (("folder", None, None), ("resident_host/host_view", "host", False),
              ("resident_host/device_view", "host", True),
              ("resident_device/device_view", "device", True))
  workers, prefetch = host.from_config(config.data)
  rates = {}
  for name, memory, device_view in variants:
    t0 = time.perf_counter()
    resident = (None if memory is None else
                resident_lib.Resident(packed_list, config, mesh, memory=memory,
                                      device_view=device_view))
    load_s = time.perf_counter() - t0
    # A fresh state per variant: a refresh donates the banks it is given.
    state = train_adapt.create_state(config, model, tx, variables, len(fl), mesh)
    holder = {"state": state, "index": 0}

    def refresh(holder=holder, resident=resident):
      s, stats = train_adapt.refresh_banks(holder["state"], fl, holder["index"], embed=embed,
                                           config=config, mesh=mesh, with_teacher=False,
                                           resident=resident)
      jax.block_until_ready(s.banks)
      holder["state"], holder["index"] = s, holder["index"] + 1
      return stats
    t0 = time.perf_counter()
    refresh()      # compiles the embedding, writes and clustering
    first = time.perf_counter() - t0
    times = _timed(refresh, max(1, repeats))
    dt = statistics.median(times)
    rates[name] = len(fl) / dt
    emit(f"refresh/{name}/images_per_s", rates[name], "images/s", min_s=min(times),
         max_s=max(times), first_s=first, load_s=load_s, pack_s=pack_s, section="refresh",
         images=len(fl), image_px=_image_px(list_path), view=config.adapt.refresh_view,
         resize=config.data.resize, crop=config.data.crop, size=model.size,
         dtype=config.model.dtype, refresh_batch=config.adapt.refresh_batch_size,
         workers=workers if memory is None else 0, prefetch=prefetch, repeats=len(times),
         **dev)
    del resident
  for name, rate in rates.items():
    if name != "folder":
      emit(f"refresh/{name}/speedup_vs_folder", rate / rates["folder"], "x", section="refresh")


def _image_px(list_path: str) -> int:
  return int(os.path.splitext(list_path)[0].rsplit("_", 1)[1])


# ------------------------------------------------------------------------------- pipeline

def _worker_counts(values) -> list[int]:
  from eercl_jax.data import host  # pylint: disable=import-outside-toplevel
  out = []
  for v in values:
    out.append(host.default_num_workers() if v == "auto" else int(v))
  return list(dict.fromkeys(out))


def _time_stream(make_iterator, num_batches: int, batch: int) -> tuple[float, float]:
  """(images/s after the first batch, seconds to the first batch) of a fresh iterator."""
  it = make_iterator()
  try:
    t0 = time.perf_counter()
    next(it)     # starts the workers
    t1 = time.perf_counter()
    for _ in range(num_batches):
      next(it)
    t2 = time.perf_counter()
  finally:
    close = getattr(it, "close", None)
    if close is not None:
      close()
  return num_batches * batch / (t2 - t1), t1 - t0


def _packed_lists(fer_list, list_path, class_names, resize, tmp) -> dict:
  """{label: the list read from a packed set}: lossless, and stored resized to `resize`."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  from eercl_jax.data import pack  # pylint: disable=import-outside-toplevel
  out = {}
  for label, size in (("packed", None), ("packed_resized", resize)):
    packed_dir = pack.pack_list(list_path, fer_list.image_root, os.path.join(tmp, label),
                                class_names, resize=size, overwrite=True)
    out[label] = dataclasses.replace(fer_list, packed_dir=packed_dir)
  return out


def bench_pipeline(config, list_path: str, workers: list[int], images: int, batch: int,
                   size: tuple[int, int], tmp: str, dev: dict) -> None:
  # pylint: disable=import-outside-toplevel
  from eercl_jax.data import host, pipelines
  class_names = tuple(config.data.class_names)
  fl = read_bench_list(list_path, class_names)
  view_cfg = pipelines.ViewConfig(resize=size[0], crop=size[1])
  num_batches = max(1, images // batch)
  sources = {"folder": fl, **_packed_lists(fl, list_path, class_names, size[0], tmp)}
  rates = {}
  for fmt, source in sources.items():
    for label, views in (("source_1view", ("weak",)),
                         ("adapt_3views", ("weak", "strong", "strong"))):
      for w in workers:
        _, prefetch = host.resolve(w, config.data.get("prefetch"))
        kw = dict(views=views, view_cfg=view_cfg, global_batch=batch, seed=0, num_workers=w,
                  prefetch=prefetch)
        make = lambda kw=kw, source=source: iter(pipelines.train_dataset(source, **kw))
        rate, first = _time_stream(make, num_batches, batch)
        rates[fmt, label, w] = rate
        emit(f"pipeline/{fmt}/{label}/images_per_s", rate, "images/s", section="pipeline",
             format=fmt, views=len(views), workers=w, prefetch=prefetch, batch=batch,
             images=num_batches * batch, image_px=_image_px(list_path), resize=size[0],
             crop=size[1], first_batch_s=first, cores=host.available_cores(),
             platform=dev["platform"])
  for (fmt, label, w), rate in rates.items():
    if fmt != "folder":   # same views, same workers: the packed path against the folder path
      emit(f"pipeline/{fmt}/{label}/speedup_vs_folder", rate / rates["folder", label, w], "x",
           section="pipeline", workers=w)


# ---------------------------------------------------------------------------------- views

def bench_views(list_path: str, class_names, count: int, size: tuple[int, int]) -> None:
  # pylint: disable=import-outside-toplevel
  import numpy as np
  from eercl_jax.data import host, transforms
  fl = read_bench_list(list_path, class_names)
  paths = [fl.paths[i % len(fl)] for i in range(count)]
  imgs = [transforms.load_image(p) for p in paths[:16]]
  resize, crop = size
  rng = np.random.default_rng(0)
  cases = {
      "decode": lambda i: transforms.load_image(paths[i]),
      "weak_view": lambda i: transforms.weak_view(imgs[i % 16], rng, resize, crop),
      "test_view": lambda i: transforms.test_view(imgs[i % 16], resize, crop),
      "strong_view": lambda i: transforms.strong_view(imgs[i % 16], rng, crop),
  }
  for name, fn in cases.items():
    fn(0)
    t0 = time.perf_counter()
    for i in range(count):
      fn(i)
    ms = (time.perf_counter() - t0) / count * 1e3
    emit(f"views/{name}/ms_per_image", ms, "ms", section="views", threads=1, images=count,
         image_px=_image_px(list_path), resize=resize, crop=crop,
         cores=host.available_cores())


# ------------------------------------------------------------------------------------ knn

def bench_knn(sizes: list[int], dim: int, batch: int, k: int, classes: int, repeats: int,
              dev: dict) -> None:
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from eercl_jax import banks as bk
  devices = jax.devices()
  s = len(devices)
  key = jax.random.PRNGKey(0)
  kf, ks, kq = jax.random.split(key, 3)
  row_bytes = (dim + classes) * 4
  for n in sizes:
    settings = dict(section="knn", rows=n, dim=dim, queries=batch, k=k, classes=classes,
                    repeats=repeats, **dev)
    feat = jax.device_put(bk_normal(kf, (n, dim), normalize=True), devices[0])
    score = jax.device_put(jax.nn.softmax(bk_normal(ks, (n, classes))), devices[0])
    q = feat[jax.random.randint(kq, (batch,), 0, n)]
    f = jax.jit(bk.aad_neighbour_probs, static_argnums=3)
    jax.block_until_ready(f(q, feat, score, k))
    times = _timed(lambda: jax.block_until_ready(f(q, feat, score, k)), repeats)
    emit("knn/replicated/ms", statistics.median(times) * 1e3, "ms", layout="replicated",
         bank_mib_per_device=n * row_bytes / 2**20, min_ms=min(times) * 1e3, **settings)
    if s == 1:
      skip(f"knn/sharded/ms (N={n})", "one device: nothing to shard over")
      continue
    mesh = jax.make_mesh((s,), ("data",))
    rows = NamedSharding(mesh, P("data"))
    featp = jax.device_put(bk.pad_bank(feat, s), rows)
    scorep = jax.device_put(bk.pad_bank(score, s), rows)
    del feat, score
    qr = jax.device_put(q, NamedSharding(mesh, P()))
    g = jax.jit(lambda a, b, c, n=n: bk.sharded_aad_neighbour_probs(a, b, c, k, mesh,
                                                                    num_valid=n))
    jax.block_until_ready(g(qr, featp, scorep))
    times = _timed(lambda: jax.block_until_ready(g(qr, featp, scorep)), repeats)
    emit("knn/sharded/ms", statistics.median(times) * 1e3, "ms", layout=f"sharded x{s}",
         bank_mib_per_device=bk.pad_rows(n, s) // s * row_bytes / 2**20,
         min_ms=min(times) * 1e3, **settings)


def bk_normal(key, shape, normalize: bool = False):
  import jax  # pylint: disable=import-outside-toplevel
  from eercl_jax.losses import l2_normalize  # pylint: disable=import-outside-toplevel
  x = jax.random.normal(key, shape)
  return l2_normalize(x) if normalize else x


# ---------------------------------------------------------------------------------- smoke

def bench_smoke(base, steps: int, tmp: str, dev: dict) -> None:
  """A short source run then an adaptation run of `base`'s model on the synthetic set."""
  # pylint: disable=import-outside-toplevel
  import ml_collections
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  from configs import demo_adapt, demo_source
  from eercl_jax import train_adapt, train_source
  root = os.path.join(tmp, "smoke")
  synthetic = dict(enabled=True, root=os.path.join(root, "data"),
                   image_size=max(base.data.resize, 32), train_per_class=20, test_per_class=8,
                   target_per_class=20, seed=0)
  results = {}
  for stage, module in (("source", demo_source), ("adapt", demo_adapt)):
    c = module.get_config()
    c.model = ml_collections.ConfigDict(base.model.to_dict())
    c.model.init_from = ""
    c.data.synthetic.update(synthetic)
    c.data.image_root = os.path.join(root, "data", "fer")
    c.data.train_list = c.data.train_list.replace("data/", synthetic["root"] + "/", 1)
    for name in list(c.data.eval_lists):
      c.data.eval_lists[name] = c.data.eval_lists[name].replace("data/", synthetic["root"] + "/",
                                                                 1)
    c.data.resize, c.data.crop = base.data.resize, base.data.crop
    c.data.num_workers, c.data.prefetch = base.data.get("num_workers"), base.data.get("prefetch")
    c.num_steps = c.log_every = c.eval_every = c.checkpoint_every = steps
    c.batch_size, c.bn_group_size, c.eval_batch_size = 64, 32, 64
    if stage == "adapt":
      c.source_checkpoint = os.path.join(root, "source")
      c.adapt.refresh_every = max(1, steps // 2)
    t0 = time.perf_counter()
    trainer = train_source if stage == "source" else train_adapt
    out = trainer.train_and_evaluate(c, os.path.join(root, stage))
    results[stage] = out
    emit(f"smoke/{stage}/wall_s", time.perf_counter() - t0, "s", section="smoke", steps=steps,
         size=c.model.size, crop=c.data.crop, dtype=c.model.dtype, batch=c.batch_size,
         target_accuracy=out["final"].get("target"), **dev)


# ----------------------------------------------------------------------------------- main

_ARGV_PRESET = {"name": "cpu"}   # the preset the command line names (for the flag defaults)


def _preset_from_argv(argv: list[str]) -> list[str]:
  """`--preset=NAME` -> `--config=configs/bench.py:NAME` (so `--config.x=...` overrides apply
  on top of the preset); no --config at all -> the 'cpu' preset. Notes which preset the flag
  defaults follow (a training config: 'cpu')."""
  preset, config_arg = None, None
  for a in argv[1:]:
    if a.startswith("--preset="):
      preset = a.split("=", 1)[1]
    elif a.startswith("--config="):
      config_arg = a.split("=", 1)[1]
  if config_arg is not None and preset:
    raise app.UsageError("give --preset or --config, not both (--config=configs/bench.py:NAME "
                         "is the preset NAME)")
  if config_arg is None:
    argv = argv[:1] + [f"--config={BENCH_CONFIG}:{preset or 'cpu'}"] + argv[1:]
  elif ":" in config_arg and os.path.basename(config_arg.split(":")[0]) == "bench.py":
    preset = config_arg.rsplit(":", 1)[1]
  _ARGV_PRESET["name"] = preset if preset in PRESET_FLAGS else "cpu"
  return argv


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  preset = PRESET_FLAGS[_ARGV_PRESET["name"]]
  config = _CONFIG.value
  only = _opt(_ONLY, preset, "only")
  unknown = sorted(set(only) - set(SECTIONS))
  if unknown:
    raise app.UsageError(f"--only: unknown section(s) {unknown}; expected {SECTIONS}")
  steps, repeats = _opt(_STEPS, preset, "steps"), _opt(_REPEATS, preset, "repeats")
  image_px = _opt(_IMAGE_PX, preset, "image_px")
  size = _opt(_PIPE_SIZE, preset, "pipeline_size") or [config.data.resize, config.data.crop]
  size = (int(size[0]), int(size[1]))
  dev = _device_settings()
  logging.info("bench on %d %s device(s) (%s); sections %s", dev["devices"], dev["device"],
               dev["platform"], only)
  src, ada = stage_configs(config)
  tmp = tempfile.mkdtemp(prefix="eercl_bench_")
  try:
    if "step" in only:
      peak = peak_tflops(dev["device"], _PEAK.value)
      for stage, c in (("source", src), ("adapt", ada)):
        if stage not in _STAGES.value:
          continue
        bench_step(stage, c, steps, repeats, _opt(_BANK_ROWS, preset, "bank_rows"), peak, dev)
    if "refresh" in only:
      lp = write_images(tmp, _opt(_REFRESH_IMAGES, preset, "refresh_images"), image_px)
      bench_refresh(ada, lp, min(repeats, 3), dev, tmp)
    if "pipeline" in only or "views" in only:
      count = max(_opt(_PIPE_IMAGES, preset, "pipeline_images"),
                  _opt(_PIPE_BATCH, preset, "pipeline_batch"))
      lp = write_images(tmp, count, image_px)
      if "views" in only:
        bench_views(lp, tuple(config.data.class_names),
                    _opt(_VIEWS_IMAGES, preset, "views_images"), size)
      if "pipeline" in only:
        bench_pipeline(src, lp, _worker_counts(_opt(_WORKERS, preset, "workers")),
                       _opt(_PIPE_IMAGES, preset, "pipeline_images"),
                       _opt(_PIPE_BATCH, preset, "pipeline_batch"), size, tmp, dev)
    if "knn" in only:
      bench_knn([int(float(n)) for n in _opt(_KNN_SIZES, preset, "knn_sizes")],
                _opt(_KNN_DIM, preset, "knn_dim"), 64, ada.adapt.aad_neighbours,
                ada.model.num_classes, repeats, dev)
    if "smoke" in only:
      smoke_steps = _opt(_SMOKE_STEPS, preset, "smoke_steps")
      if smoke_steps > 0:
        bench_smoke(config, smoke_steps, tmp, dev)
      else:
        skip("smoke", "--smoke_steps=0")
  finally:
    with contextlib.suppress(OSError):
      shutil.rmtree(tmp)


def run(argv: list[str] | None = None) -> None:
  try:
    argv = _preset_from_argv(list(sys.argv if argv is None else argv))
  except app.UsageError as e:
    sys.exit(f"FATAL Flags parsing error: {e}")
  app.run(main, argv=argv)


if __name__ == "__main__":
  run()
