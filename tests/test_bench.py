"""`python -m eercl_jax.bench`: the GPU day's script in its CPU-sized dry run (every section's
JSON lines: names, units, positive finite values, derived figures), and the step section's
compile-only figures (device memory, FLOPs)."""
import pytest
import json
import math
import os
import subprocess

from tests.conftest import REPO

pytestmark = pytest.mark.slow   # an end-to-end run: not in the fast tier

def test_gpu_check_script_dry_run():
  """benchmarks/gpu_check.sh with its CPU-sized preset: every section of the GPU day's script,
  smoke runs included, so that day does not start with a broken script; every figure is named,
  has a unit and a positive finite value, and the derived ones follow from the measured ones."""
  env = dict(os.environ, BENCH_CONFIG="configs/bench.py:gpu_check,runlocal",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_check.sh"),
                         "--config.bench.peak_tflops=1"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
  figures = {d["name"]: d for d in lines if "value" in d}
  skipped = {d["name"]: d["skipped"] for d in lines if "skipped" in d}
  assert {n.split("/")[0] for n in figures} == {"step", "refresh", "pipeline", "views", "knn",
                                                "smoke"}, skipped
  want = {"step/source/images_per_s", "step/source/step_time_ms", "step/source/gflop_per_step",
          "step/source/gflop_per_image", "step/source/tflops", "step/source/mfu",
          "step/source/device_memory_gib", "step/adapt/device_memory_gib",
          "refresh/folder/images_per_s", "refresh/resident_host/host_view/images_per_s",
          "refresh/resident_device/device_view/images_per_s",
          "refresh/resident_host/device_view/speedup_vs_folder", "views/decode/ms_per_image",
          "views/strong_view/ms_per_image", "pipeline/folder/source_1view/images_per_s",
          "pipeline/folder/adapt_3views/images_per_s",
          "pipeline/packed/source_1view/images_per_s",
          "pipeline/packed_resized/adapt_3views/speedup_vs_folder", "knn/replicated/ms",
          "knn/sharded/ms", "smoke/source/wall_s", "smoke/adapt/wall_s"}
  assert want <= set(figures), (sorted(want - set(figures)), skipped)
  for name, d in figures.items():
    assert math.isfinite(d["value"]) and d["value"] > 0, (name, d)
    assert d["unit"], name
  step = figures["step/source/gflop_per_step"]
  assert step["devices"] == 2 and step["dtype"] == "float32"   # runlocal: the CPU dry run
  # The MFU is the achieved rate over the given peak (1 TFLOP/s per device, 2 devices).
  assert math.isclose(figures["step/source/mfu"]["value"],
                      figures["step/source/tflops"]["value"] / 2, rel_tol=1e-9)
  assert figures["step/source/images_per_s"]["value"] == \
      step["batch"] / (figures["step/source/step_time_ms"]["value"] / 1e3)
  # Speed-ups are the ratio of the two measured rates.
  assert math.isclose(figures["pipeline/packed/source_1view/speedup_vs_folder"]["value"],
                      figures["pipeline/packed/source_1view/images_per_s"]["value"]
                      / figures["pipeline/folder/source_1view/images_per_s"]["value"])
  assert figures["knn/sharded/ms"]["layout"] == "sharded x2"


def _step_figures(settings_update, stage="source"):
  from configs import bench  # pylint: disable=import-outside-toplevel
  from eercl_jax import benchmarks  # pylint: disable=import-outside-toplevel
  c = bench.get_config("cpu,runlocal")
  c.bench.update(settings_update)
  figures = list(benchmarks.step(stage, c[stage], c.bench, benchmarks.device_settings()))
  return {d["name"]: d for d in figures}


def test_compile_only_step_reports_memory_and_flops_without_running():
  """--config.bench.compile_only=True: the compiled step's device memory (its parts add up) and
  FLOPs, and no timing (nothing ran)."""
  figures = _step_figures({"compile_only": True})
  assert set(figures) == {"step/source/compile_s", "step/source/device_memory_gib",
                          "step/source/gflop_per_step", "step/source/gflop_per_image"}
  m = figures["step/source/device_memory_gib"]
  assert m["value"] > 0 and math.isclose(
      m["value"], m["argument_gib"] + m["output_gib"] + m["temp_gib"] - m["alias_gib"])
  # The step donates its state: what it returns reuses the arguments' buffers.
  assert m["alias_gib"] > 0


def test_compile_for_a_described_gpu():
  """--config.bench.compile_for=benchmarks/gpu_targets/h100_sxm.txtpb compiles the step for that
  GPU without one (needs jax's CUDA plugin: requirements-gpu.txt), nothing run."""
  pytest.importorskip("jax_plugins.xla_cuda12", reason="jax's CUDA plugin is not installed")
  figures = _step_figures({"compile_for": os.path.join(REPO, "benchmarks", "gpu_targets",
                                                       "h100_sxm.txtpb")})
  m = figures["step/source/device_memory_gib"]
  assert m["device"] == "NVIDIA H100 80GB HBM3" and m["platform"] == "cuda (compile only)"
  assert m["value"] > 0 and not any(n.endswith(("images_per_s", "step_time_ms"))
                                    for n in figures)
