"""Two CPU processes on localhost (JAX's distributed runtime, CPU collectives) run a few source
and adaptation steps to the same losses as one process with the same global batch."""
import os
import re
import socket
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow   # an end-to-end run: not in the fast tier

STEPS = ["--config.num_steps=3", "--config.log_every=1", "--config.eval_every=3",
         "--config.checkpoint_every=3"]


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(args, cwd, num_processes):
  base = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
              XLA_FLAGS="--xla_force_host_platform_device_count=1")
  cmd = [sys.executable, "-m", "eercl_jax.main", *args]
  if num_processes == 1:
    procs = [subprocess.Popen(cmd, cwd=cwd, env=base, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)]
  else:
    port = _free_port()
    procs = [subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=dict(base, JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                                  JAX_NUM_PROCESSES=str(num_processes),
                                                  JAX_PROCESS_ID=str(i)))
             for i in range(num_processes)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return outs[0][0]


def _losses(workdir):
  log = open(os.path.join(workdir, "logs", "train.log")).read()
  return [float(x) for x in re.findall(r"step \d+/\d+ loss=([0-9.]+)", log)]


def test_two_processes_match_one(data_dir, tmp_path):
  runs = {}
  for n in (1, 2):
    src, ada = str(tmp_path / f"src{n}"), str(tmp_path / f"ada{n}")
    out = _launch([f"--config={REPO}/configs/demo_source.py:runlocal", f"--workdir={src}",
                   *STEPS], data_dir, n)
    assert "[source] final" in out
    out = _launch([f"--config={REPO}/configs/demo_adapt.py:runlocal", f"--workdir={ada}",
                   *STEPS, f"--config.source_checkpoint={src}",
                   "--config.adapt.refresh_every=2",
                   "--config.adapt.refresh_batch_size=64"], data_dir, n)
    assert "[adapt] final" in out
    runs[n] = (_losses(src), _losses(ada))
    assert len(runs[n][0]) == 3 and len(runs[n][1]) == 3
  assert runs[2][0] == pytest.approx(runs[1][0], rel=1e-4)
  assert runs[2][1] == pytest.approx(runs[1][1], rel=1e-4)
  # Only process 0 writes: one log file, one set of checkpoints.
  assert os.listdir(tmp_path / "src2" / "checkpoints") == ["3"]
