"""What a run's stages cost on the devices and the host at hand, section by section (the command:
`python -m eercl_jax.bench`; its settings: configs/bench.py).

Every section is a generator of figures - dicts {"name", "value", "unit", ...the settings it
was measured with} - or {"name", "skipped": reason} where a figure cannot be measured here. The
steps and the refresh are the stages' own builds (`train_source.build`, `train_adapt.build`),
with random weights and random images:

  step      the jitted source step and adaptation step: images/s, step time (median and spread
            over `repeats` timed runs of `steps` steps each, after compilation), XLA's FLOPs
            per step (`compiled.cost_analysis()`), achieved TFLOP/s, MFU against the device's
            bfloat16 dense peak, and the compiled step's device memory (XLA's memory analysis:
            arguments + outputs + temporaries - donated aliases). An adaptation "image" is one
            target image in its three views (teacher forward + online forward and backward).
            `compile_only`: the compiled step's memory and FLOPs, without running it (what a
            device without the memory, or a CPU, can still say about a large step);
            `compile_for`: the same for the GPU an XLA GPU target config describes, compiled
            on this machine (no GPU needed; README: Device memory (estimated)).
  refresh   the adaptation's full pass over the target list (`AdaptBuild.refresh`) over
            `refresh_images` synthetic JPEGs: through the input pipeline, then from the packed
            list resident in host RAM (host view; device view) and in device memory.
  pipeline  the training input pipeline alone: one weak view (source stage) and weak + two
            strong views (adaptation), per grain worker count, folder and packed data.
  views     one image's cost on one thread: JPEG decode, weak, test and strong views.
  knn       the AaD bank lookup (top-k + gather) and bank memory for N rows, replicated on one
            device and sharded over all devices.
  smoke     a short source run then an adaptation run of the stage configs' model on the
            built-in synthetic data, through the training entry (`train_and_evaluate`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import statistics
import sys
import time
from typing import Any, Callable, Iterator

import numpy as np

Figures = Iterator[dict]

# bfloat16 dense peaks in TFLOP/s per device, from the vendors' datasheets (substring of
# `jax.devices()[0].device_kind` -> peak). Large matmuls reach less: ~790 measured on an H200
# (docs/toolchain.md#vit-b16-flops-and-mfu); a config's bench.peak_tflops overrides.
PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0))


def figure(name: str, value: float, unit: str, **settings) -> dict:
  return {"name": name, "value": float(value), "unit": unit, **settings}


def skipped(name: str, reason: str) -> dict:
  return {"name": name, "skipped": reason}


def device_settings() -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  d = jax.devices()[0]
  return {"platform": d.platform, "device": d.device_kind, "devices": jax.device_count()}


def peak_tflops(device_kind: str, override: float | None) -> tuple[float | None, str]:
  """(peak TFLOP/s per device, where it comes from) or (None, why not)."""
  if override:
    return float(override), "config.bench.peak_tflops"
  for key, peak in PEAK_TFLOPS:
    if key.lower() in device_kind.lower():
      return peak, f"datasheet bfloat16 dense ({key})"
  return None, f"no peak known for {device_kind!r}: set --config.bench.peak_tflops"


def _timed(fn: Callable[[], Any], repeats: int) -> list[float]:
  """Wall times of `repeats` calls of fn (which blocks until its work is done)."""
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


def compiled_cost(compiled) -> dict[str, float]:
  """XLA's figures of a compiled program, per device: 'flops' and the device memory it needs,
  'memory_bytes' = arguments + outputs + temporaries - donated (aliased) buffers (0 where the
  backend gives no analysis)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  out = {"flops": float(cost.get("flops", 0.0)) if cost else 0.0, "memory_bytes": 0.0}
  try:
    m = compiled.memory_analysis()
  except (AttributeError, NotImplementedError, RuntimeError):
    m = None
  if m is not None:
    out["memory_bytes"] = float(m.argument_size_in_bytes + m.output_size_in_bytes
                                + m.temp_size_in_bytes - m.alias_size_in_bytes)
    for part in ("argument", "output", "alias", "temp"):
      out[f"{part}_bytes"] = float(getattr(m, f"{part}_size_in_bytes"))
  return out


def random_variables(model, crop: int) -> dict:
  """{'params', 'batch_stats'} of `model` initialised from a fixed key."""
  import jax  # pylint: disable=import-outside-toplevel
  from eercl_jax.models import eercl  # pylint: disable=import-outside-toplevel
  return eercl.init_variables(model, jax.random.PRNGKey(0), crop)


# ----------------------------------------------------------------------------------- step

DEVICELESS_OPTIONS = {"xla_gpu_enable_triton_gemm": False, "xla_gpu_autotune_level": 0}


def gpu_target(path: str):
  """One GPU described by an XLA GPU target config (a text proto, benchmarks/gpu_targets/), as a
  compile-only device: jax's CUDA plugin compiles for it on a machine without a GPU."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  with open(path, encoding="utf-8") as f:
    text = f.read()
  return topologies.get_topology_desc("bench", "cuda", target_config=text,
                                      topology="1x1x1").devices[0]


def _lower_for(device, stage: str, config, built, batch):
  """`built.step` lowered for `device` (a compile-only GPU): the same function, shardings and
  donation on a one-device mesh of it, the arguments as shapes."""
  # pylint: disable=import-outside-toplevel
  import jax
  from eercl_jax import parallel, train_adapt
  mesh = parallel.create_mesh([device])
  rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  if stage == "source":
    state = jax.tree_util.tree_map(lambda _: rep, built.state)
  else:
    state = train_adapt.state_shardings(built.state, mesh, config.adapt.shard_banks)
  spec = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  step_fn = jax.jit(built.step.__wrapped__, in_shardings=(state, data),
                    out_shardings=(state, rep), donate_argnums=0)
  return step_fn.lower(jax.tree_util.tree_map(spec, built.state, state),
                       jax.tree_util.tree_map(lambda x: spec(x, data), batch))


def step(stage: str, config, settings, dev: dict) -> Figures:
  """Figures of `config`'s jitted step (stage 'source' or 'adapt') on every device, or with
  `settings.compile_for` the compiled step's figures for the GPU that file describes."""
  # pylint: disable=import-outside-toplevel
  import jax
  from eercl_jax import parallel, train_adapt, train_source
  from eercl_jax.models import eercl
  target = None
  if settings.compile_for:
    if stage == "adapt" and config.adapt.shard_banks:
      yield skipped(f"step/{stage}", "compile_for: one described GPU, no banks to shard over")
      return
    target = gpu_target(settings.compile_for)
    dev = dict(dev, platform="cuda (compile only)", device=target.device_kind, devices=1,
               gpu_target=os.path.basename(settings.compile_for))
  # With compile_for the stage is built on one local device and lowered for the target.
  mesh = parallel.create_mesh(jax.devices()[:1] if target else None)
  b, crop = config.batch_size, config.data.crop
  rng = np.random.default_rng(0)
  image = lambda: rng.integers(0, 256, (b, crop, crop, 3), np.uint8)
  if stage == "source":
    built = train_source.build(config, mesh)
    batch = {"image": image(), "label": rng.integers(0, 7, b, np.int32)}
  else:
    n = settings.bank_rows
    variables = random_variables(eercl.create_model(config.model), crop)
    built = train_adapt.build(config, mesh, variables, n)
    batch = {"weak": image(), "strong1": image(), "strong2": image(),
             "label": rng.integers(0, 7, b, np.int32),
             "index": rng.permutation(n)[:b].astype(np.int32)}
  batch = parallel.shard_batch(batch, mesh)
  state = built.state
  t0 = time.perf_counter()
  lowered = (built.step.lower(state, batch) if target is None
             else _lower_for(target, stage, config, built, batch))
  # Without a GPU, XLA cannot autotune, and its untuned Triton GEMM tiling fails on some dots
  # ("Couldn't find output tile sizes"): the deviceless compile uses cuBLAS GEMMs, untuned.
  compiled = lowered.compile(None if target is None else DEVICELESS_OPTIONS)
  compile_s = time.perf_counter() - t0
  cost = compiled_cost(compiled)
  n = dev["devices"]
  info = dict(section="step", stage=stage, backbone=config.model.backbone,
              size=built.model.size, crop=crop, dtype=config.model.dtype,
              remat=bool(config.model.remat), batch=b, **dev)
  if stage == "adapt":
    info.update(bank_rows=settings.bank_rows, views_per_image=3)
  name = f"step/{stage}"
  yield figure(f"{name}/compile_s", compile_s, "s", **info)
  if cost["memory_bytes"] > 0:
    parts = {f"{p}_gib": cost[f"{p}_bytes"] / 2**30 for p in ("argument", "output", "alias",
                                                              "temp")}
    yield figure(f"{name}/device_memory_gib", cost["memory_bytes"] / 2**30, "GiB", **parts,
                 per="device", **info)
  else:
    yield skipped(f"{name}/device_memory_gib", "XLA gave no memory analysis on this backend")
  total = cost["flops"] * n   # the cost analysis of an SPMD program counts one device's share
  if total > 0:
    yield figure(f"{name}/gflop_per_step", total / 1e9, "GFLOP", **info)
    yield figure(f"{name}/gflop_per_image", total / b / 1e9, "GFLOP", **info)
  else:
    yield skipped(f"{name}/flops", "XLA's cost analysis gave no FLOPs on this backend")
  if settings.compile_only or target is not None:   # memory and FLOPs only, nothing run
    return
  holder = {"state": state}

  def run_steps(count):
    s = holder["state"]
    for _ in range(count):
      s, metrics = compiled(s, batch)
    jax.block_until_ready((s, metrics))
    holder["state"] = s
  run_steps(1)   # warm-up: the first call allocates and transfers
  times = [t / settings.steps for t in _timed(lambda: run_steps(settings.steps),
                                              settings.repeats)]
  dt = statistics.median(times)
  info.update(steps=settings.steps, repeats=settings.repeats)
  yield figure(f"{name}/images_per_s", b / dt, "images/s", per_device=b / dt / n, **info)
  yield figure(f"{name}/step_time_ms", dt * 1e3, "ms", min_ms=min(times) * 1e3,
               max_ms=max(times) * 1e3, spread=(max(times) - min(times)) / dt, **info)
  if total <= 0:
    return
  achieved = total / dt / 1e12
  yield figure(f"{name}/tflops", achieved, "TFLOP/s", per_device=achieved / n, **info)
  peak, source = peak_tflops(dev["device"], settings.peak_tflops)
  if peak is None:
    yield skipped(f"{name}/mfu", source)
  else:
    yield figure(f"{name}/mfu", achieved / (peak * n), "fraction", peak_tflops=peak,
                 peak_source=source, **info)


# ------------------------------------------------------------------------ synthetic images

def write_images(root: str, count: int, px: int, distinct: int = 16) -> str:
  """`count` JPEG files of `px` x `px` synthetic faces under `root/fer` and their list
  (labels cycle through the classes); `distinct` faces are drawn and their bytes reused, since
  decoding cost does not depend on which face a file holds. Returns the list path."""
  # pylint: disable=import-outside-toplevel
  from eercl_jax.data import lists
  from eercl_jax.data.datasets import synthetic
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
    lines.append((rel, i % len(blobs) % len(synthetic.CLASSES)))
  list_path = os.path.join(root, f"bench_{count}_{px}.txt")
  lists.write_list(list_path, lines, synthetic.CLASSES)   # with its class-order file
  return list_path


def read_bench_list(list_path: str, class_names):
  from eercl_jax.data import lists  # pylint: disable=import-outside-toplevel
  return lists.read_list(list_path, os.path.join(os.path.dirname(list_path), "fer"),
                         class_names, check_images="none",
                         names_from="config.data.class_names")


def _image_px(list_path: str) -> int:
  return int(os.path.splitext(list_path)[0].rsplit("_", 1)[1])


# -------------------------------------------------------------------------------- refresh

def refresh(config, list_path: str, repeats: int, dev: dict, tmp: str) -> Figures:
  """The adaptation's full-list refresh pass, before and after packing: through the input
  pipeline (JPEG decode + view on the host), then from the packed list resident in host RAM
  (host view; device view) and in device memory (device view); and the speed-ups."""
  # pylint: disable=import-outside-toplevel
  import jax
  from eercl_jax import parallel, train_adapt
  from eercl_jax.data import packed, resident as resident_lib
  from eercl_jax.models import eercl
  mesh = parallel.create_mesh()
  class_names = tuple(config.data.class_names)
  fl = read_bench_list(list_path, class_names)
  variables = random_variables(eercl.create_model(config.model), config.data.crop)
  t0 = time.perf_counter()
  packed_list = dataclasses.replace(fl, packed_dir=packed.pack_list(
      list_path, fl.image_root, os.path.join(tmp, "refresh_packed"), class_names,
      resize=config.data.resize, overwrite=True))
  pack_s = time.perf_counter() - t0
  variants = (("folder", None, None), ("resident_host/host_view", "host", False),
              ("resident_host/device_view", "host", True),
              ("resident_device/device_view", "device", True))
  rates = {}
  for name, memory, device_view in variants:
    # A fresh build per variant: a refresh donates the banks it is given.
    built = train_adapt.build(config, mesh, variables, len(fl))
    t0 = time.perf_counter()
    resident = (None if memory is None else
                resident_lib.Resident(packed_list, mesh, built.evaluator.loader, memory=memory,
                                      device_view=device_view))
    load_s = time.perf_counter() - t0
    holder = {"state": built.state, "index": 0}

    def one(holder=holder, resident=resident, built=built):
      s, stats = built.refresh(holder["state"], fl, holder["index"], with_teacher=False,
                               resident=resident)
      jax.block_until_ready(s.banks)
      holder["state"], holder["index"] = s, holder["index"] + 1
      return stats
    t0 = time.perf_counter()
    one()      # compiles the embedding, writes and clustering
    first = time.perf_counter() - t0
    times = _timed(one, max(1, repeats))
    dt = statistics.median(times)
    rates[name] = len(fl) / dt
    loader = built.evaluator.loader
    yield figure(f"refresh/{name}/images_per_s", rates[name], "images/s", min_s=min(times),
                 max_s=max(times), first_s=first, load_s=load_s, pack_s=pack_s,
                 section="refresh", images=len(fl), image_px=_image_px(list_path),
                 view=config.adapt.refresh_view, resize=config.data.resize,
                 crop=config.data.crop, size=built.model.size, dtype=config.model.dtype,
                 refresh_batch=config.adapt.refresh_batch_size,
                 workers=loader.num_workers if memory is None else 0,
                 prefetch=loader.prefetch, repeats=len(times), **dev)
    del resident
  for name, rate in rates.items():
    if name != "folder":
      yield figure(f"refresh/{name}/speedup_vs_folder", rate / rates["folder"], "x",
                   section="refresh")


# ------------------------------------------------------------------------------- pipeline

def names(text: str) -> list[str]:
  """'a,b' -> ['a', 'b'] (the bench settings' lists)."""
  return [t.strip() for t in str(text).split(",") if t.strip()]


def worker_counts(text: str) -> list[int]:
  """Worker counts, 'auto' = the host-following default (data/host.py); duplicates once."""
  from eercl_jax.data import host  # pylint: disable=import-outside-toplevel
  return list(dict.fromkeys(host.default_num_workers() if v == "auto" else int(v)
                            for v in names(text)))


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
  from eercl_jax.data import packed  # pylint: disable=import-outside-toplevel
  out = {}
  for label, size in (("packed", None), ("packed_resized", resize)):
    packed_dir = packed.pack_list(list_path, fer_list.image_root, os.path.join(tmp, label),
                                  class_names, resize=size, overwrite=True)
    out[label] = dataclasses.replace(fer_list, packed_dir=packed_dir)
  return out


def pipeline(class_names, list_path: str, settings, prefetch: int | None, tmp: str,
             dev: dict) -> Figures:
  # pylint: disable=import-outside-toplevel
  from eercl_jax.data import host, pipelines
  fl = read_bench_list(list_path, class_names)
  resize, crop = (int(v) for v in names(settings.pipeline_size))
  view_cfg = pipelines.ViewConfig(resize=resize, crop=crop)
  batch = settings.pipeline_batch
  num_batches = max(1, settings.pipeline_images // batch)
  sources = {"folder": fl, **_packed_lists(fl, list_path, class_names, resize, tmp)}
  rates = {}
  for fmt, source in sources.items():
    for label, views in (("source_1view", ("weak",)),
                         ("adapt_3views", ("weak", "strong", "strong"))):
      for w in worker_counts(settings.workers):
        _, depth = host.resolve(w, prefetch)
        loader = pipelines.Loader(view_cfg, w, depth)
        make = lambda loader=loader, source=source, views=views: loader.train(
            source, views, batch, seed=0)
        rate, first = _time_stream(make, num_batches, batch)
        rates[fmt, label, w] = rate
        yield figure(f"pipeline/{fmt}/{label}/images_per_s", rate, "images/s",
                     section="pipeline", format=fmt, views=len(views), workers=w,
                     prefetch=depth, batch=batch, images=num_batches * batch,
                     image_px=_image_px(list_path), resize=resize, crop=crop,
                     first_batch_s=first, cores=host.available_cores(),
                     platform=dev["platform"])
  for (fmt, label, w), rate in rates.items():
    if fmt != "folder":   # same views, same workers: the packed path against the folder path
      yield figure(f"pipeline/{fmt}/{label}/speedup_vs_folder", rate / rates["folder", label, w],
                   "x", section="pipeline", workers=w)


# ---------------------------------------------------------------------------------- views

def views(list_path: str, class_names, count: int, size: tuple[int, int]) -> Figures:
  # pylint: disable=import-outside-toplevel
  from eercl_jax.data import host, images, transforms
  fl = read_bench_list(list_path, class_names)
  paths = [fl.paths[i % len(fl)] for i in range(count)]
  imgs = [images.load_image(p) for p in paths[:16]]
  resize, crop = size
  rng = np.random.default_rng(0)
  cases = {
      "decode": lambda i: images.load_image(paths[i]),
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
    yield figure(f"views/{name}/ms_per_image", ms, "ms", section="views", threads=1,
                 images=count, image_px=_image_px(list_path), resize=resize, crop=crop,
                 cores=host.available_cores())


# ------------------------------------------------------------------------------------ knn

def knn(sizes, dim: int, batch: int, k: int, classes: int, repeats: int, dev: dict) -> Figures:
  # pylint: disable=import-outside-toplevel
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from eercl_jax import banks as bk, losses, parallel
  devices = jax.devices()
  s = len(devices)
  kf, ks, kq = jax.random.split(jax.random.PRNGKey(0), 3)
  row_bytes = (dim + classes) * 4
  for n in sizes:
    n = int(float(n))
    info = dict(section="knn", rows=n, dim=dim, queries=batch, k=k, classes=classes,
                repeats=repeats, **dev)
    feat = jax.device_put(losses.l2_normalize(jax.random.normal(kf, (n, dim))), devices[0])
    score = jax.device_put(jax.nn.softmax(jax.random.normal(ks, (n, classes))), devices[0])
    q = feat[jax.random.randint(kq, (batch,), 0, n)]
    f = jax.jit(bk.aad_neighbour_probs, static_argnums=3)
    jax.block_until_ready(f(q, feat, score, k))
    times = _timed(lambda: jax.block_until_ready(f(q, feat, score, k)), repeats)
    yield figure("knn/replicated/ms", statistics.median(times) * 1e3, "ms", layout="replicated",
                 bank_mib_per_device=n * row_bytes / 2**20, min_ms=min(times) * 1e3, **info)
    if s == 1:
      yield skipped(f"knn/sharded/ms (N={n})", "one device: nothing to shard over")
      continue
    mesh = parallel.create_mesh(devices)
    rows = NamedSharding(mesh, P(parallel.DATA_AXIS))
    featp = jax.device_put(bk.pad_bank(feat, s), rows)
    scorep = jax.device_put(bk.pad_bank(score, s), rows)
    del feat, score
    qr = jax.device_put(q, parallel.replicated(mesh))
    g = jax.jit(lambda a, b, c, n=n: bk.sharded_aad_neighbour_probs(a, b, c, k, mesh,
                                                                    num_valid=n))
    jax.block_until_ready(g(qr, featp, scorep))
    times = _timed(lambda: jax.block_until_ready(g(qr, featp, scorep)), repeats)
    yield figure("knn/sharded/ms", statistics.median(times) * 1e3, "ms", layout=f"sharded x{s}",
                 bank_mib_per_device=bk.pad_rows(n, s) // s * row_bytes / 2**20,
                 min_ms=min(times) * 1e3, **info)


# ---------------------------------------------------------------------------------- smoke

def smoke(source_config, adapt_config, steps: int, tmp: str, dev: dict) -> Figures:
  """A short source run, then an adaptation from it, of the stage configs' model on the
  built-in synthetic data, through the stages' training entry."""
  # pylint: disable=import-outside-toplevel
  import ml_collections
  from eercl_jax import config_defaults, train_adapt, train_source
  root = os.path.join(tmp, "smoke")
  for stage, base, trainer in (("source", source_config, train_source),
                               ("adapt", adapt_config, train_adapt)):
    c = config_defaults.synthetic_data(ml_collections.ConfigDict(base.to_dict()),
                                       os.path.join(root, "data"))
    c.data.synthetic.update(config_defaults.RUNLOCAL_SYNTHETIC,
                            image_size=max(c.data.resize, 32))
    c.model.init_from = ""
    c.num_steps = c.log_every = c.eval_every = c.checkpoint_every = steps
    c.batch_size, c.bn_group_size, c.eval_batch_size = 64, 32, 64
    if stage == "adapt":
      c.source_checkpoint = os.path.join(root, "source")
      c.adapt.refresh_every = max(1, steps // 2)
    t0 = time.perf_counter()
    # The run's closing summary line goes to stderr: the bench's stdout is JSON lines only.
    with contextlib.redirect_stdout(sys.stderr):
      out = trainer.train_and_evaluate(c, os.path.join(root, stage))
    yield figure(f"smoke/{stage}/wall_s", time.perf_counter() - t0, "s", section="smoke",
                 steps=steps, size=c.model.size, crop=c.data.crop, dtype=c.model.dtype,
                 batch=c.batch_size, target_accuracy=out["final"].get("target"), **dev)


# ------------------------------------------------------------------------------- the run

def run(config, tmp: str) -> Figures:
  """Every section `config.bench.sections` asks for, with `config.source` / `config.adapt`."""
  s = config.bench
  sections = names(s.sections)
  dev = device_settings()
  stages = [st for st in names(s.stages) if st in config]
  if "step" in sections:
    for st in stages:
      yield from step(st, config[st], s, dev)
  if "refresh" in sections:
    if "adapt" in config:
      lp = write_images(tmp, s.refresh_images, s.image_px)
      yield from refresh(config.adapt, lp, min(s.repeats, 3), dev, tmp)
    else:
      yield skipped("refresh", "no adaptation config")
  any_stage = config[stages[0]] if stages else config.source
  if "pipeline" in sections or "views" in sections:
    lp = write_images(tmp, max(s.pipeline_images, s.pipeline_batch), s.image_px)
    class_names = tuple(any_stage.data.class_names)
    if "views" in sections:
      size = tuple(int(v) for v in names(s.pipeline_size))
      yield from views(lp, class_names, s.views_images, size)
    if "pipeline" in sections:
      yield from pipeline(class_names, lp, s, any_stage.data.prefetch, tmp, dev)
  if "knn" in sections:
    a = config.adapt if "adapt" in config else None
    yield from knn(names(s.knn_sizes), s.knn_dim, 64, a.adapt.aad_neighbours if a else 4,
                   any_stage.model.num_classes, s.repeats, dev)
  if "smoke" in sections:
    if s.smoke_steps <= 0:
      yield skipped("smoke", "config.bench.smoke_steps=0")
    elif "source" not in config or "adapt" not in config:
      yield skipped("smoke", "needs both stage configs")
    else:
      yield from smoke(config.source, config.adapt, s.smoke_steps, tmp, dev)
