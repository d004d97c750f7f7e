"""Data worker processes under a scheduler's signals: a SIGTERM to the whole process group (slurm's
--signal=TERM without B:, scancel, Ctrl-C's SIGINT) leaves started workers reading - the main
process decides when to stop - and they end when the main process dies without closing them (no
orphans). A worker still starting when the signal comes can die of it: the run treats that as part
of the stop (test_run.py::test_a_worker_killed_by_the_stop_signal_is_part_of_the_stop)."""
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import psutil
import pytest
from PIL import Image

from tests.conftest import REPO

pytestmark = pytest.mark.slow   # a subprocess starting worker processes

SCRIPT = textwrap.dedent("""
  import os, signal, sys, threading, time
  from absl import flags
  flags.FLAGS.mark_as_parsed()   # grain reads its flags when it starts workers
  import numpy as np
  from eercl_jax.data import lists, pipelines

  def batches(fl, workers):
    return iter(pipelines.train_dataset(fl, views=("weak", "strong"), global_batch=4, seed=3,
                                        view_cfg=pipelines.ViewConfig(20, 16), num_workers=workers))

  def main():
    fl = lists.read_list(sys.argv[1], os.path.dirname(sys.argv[1]), ("a", "b", "c"))
    got = []
    signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
    signal.signal(signal.SIGINT, lambda s, f: got.append(s))
    stop = threading.Event()

    def preempt():   # the whole group, again and again
      while not stop.wait(0.02):
        os.killpg(0, signal.SIGTERM)
        os.killpg(0, signal.SIGINT)
    it = batches(fl, 2)
    read = [next(it), next(it)]   # one from each worker: both started
    threading.Thread(target=preempt, daemon=True).start()
    time.sleep(0.3)
    read += [next(it) for _ in range(6)]
    stop.set()
    reference = batches(fl, 0)
    want = [next(reference) for _ in range(8)]
    for a, b in zip(read, want):
      for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    print("same batches; signals received:", len(got) > 0, flush=True)
    import psutil
    workers = [p.pid for p in psutil.Process().children()
               if "resource_tracker" not in " ".join(p.cmdline())]
    print("workers", *workers, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)   # dies without closing its iterator

  if __name__ == "__main__":
    main()
""")


def test_workers_outlive_group_signals_and_die_with_the_main_process(tmp_path):
  lines = []
  for i in range(12):
    Image.fromarray(np.random.default_rng(i).integers(0, 256, (22, 26, 3), np.uint8)).save(
        tmp_path / f"{i}.png")
    lines.append(f"{i}.png {i % 3}\n")
  (tmp_path / "list.txt").write_text("".join(lines))
  (tmp_path / "script.py").write_text(SCRIPT)
  # Output to files, not pipes: workers left behind would hold a pipe open and hang the wait.
  with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
    proc = subprocess.run([sys.executable, str(tmp_path / "script.py"),
                           str(tmp_path / "list.txt")], cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=REPO), stdout=out, stderr=err,
                          timeout=600, start_new_session=True)
  stdout, stderr = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
  assert proc.returncode == -signal.SIGKILL, stderr[-3000:]
  assert "same batches; signals received: True" in stdout, stderr[-3000:]
  pids = [int(p) for p in stdout.split("workers", 1)[1].split()]
  assert len(pids) == 2
  workers = []
  for pid in pids:
    try:
      workers.append(psutil.Process(pid))
    except psutil.NoSuchProcess:
      pass
  _, alive = psutil.wait_procs(workers, timeout=15)
  for p in alive:
    p.kill()
  assert not alive, f"data workers outlived their main process: {alive}"
