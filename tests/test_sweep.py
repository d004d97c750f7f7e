"""The sweep launcher: the grid's commands and dependencies, SLURM submission with a fake sbatch,
the array script under a fake SLURM environment, and the one-machine runner on the synthetic data
(interrupted, rerun, summarised)."""
import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time

import pytest

from eercl_jax import constants, grid
from eercl_jax.errors import UserError
from tests.conftest import REPO

SBATCH = os.path.join(REPO, "launch", "sweep.sbatch")


def _sweep(*args, cwd=REPO, env=None, timeout=120):
  return subprocess.run([sys.executable, "-m", "eercl_jax.sweep", *args], cwd=cwd,
                        env=dict(os.environ, PYTHONPATH=REPO, **(env or {})),
                        capture_output=True, text=True, timeout=timeout)


def _grid_args(root):
  return [f"--root={root}", "--sources=configs/source_raf.py",
          "--targets=configs/adapt_ck.py,configs/adapt_jaffe.py", "--seeds=1,2", "--python=py"]


def test_dry_run_prints_every_command_and_dependency(tmp_path):
  root = tmp_path / "paper"
  proc = _sweep(*_grid_args(root), "--mode=slurm", "--dry_run")
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  for seed in (1, 2):
    src = root / f"source_raf_seed{seed}"
    assert (f"py -m eercl_jax.main --config=configs/source_raf.py --workdir={src} "
            f"--config.seed={seed}") in out
    for tgt in ("ck", "jaffe"):
      assert (f"py -m eercl_jax.main --config=configs/adapt_{tgt}.py "
              f"--workdir={root}/raf2{tgt}_seed{seed} --config.seed={seed} "
              f"--config.source_checkpoint={src}   (after source_raf task {seed - 1}: "
              f"source_raf_seed{seed})") in out
  sbatch = [line for line in out.splitlines() if line.startswith("sbatch")]
  assert len(sbatch) == 4  # sources, one array per target, the summary
  assert "--array=0-1" in sbatch[0] and sbatch[0].endswith(f"{SBATCH} {root}/sweep/source_raf.tsv")
  for line, tgt in zip(sbatch[1:3], ("ck", "jaffe")):
    assert "--dependency=aftercorr:<source_raf job id>" in line
    assert line.endswith(f"{root}/sweep/raf2{tgt}.tsv")
  assert ("--dependency=afterany:<source_raf job id>:<raf2ck job id>:<raf2jaffe job id>"
          in sbatch[3])
  assert (f"--wrap=py -m eercl_jax.summarize --out={root}/summary @{root}/sweep/runs.txt; "
          f"py -m eercl_jax.summarize --layout=groups --out={root}/summary_groups "
          f"@{root}/sweep/runs.txt") in sbatch[3]
  assert not root.exists()  # nothing written, nothing run

  local = _sweep(*_grid_args(root), "--dry_run", "--devices=0,1,2,3", "--gpus_per_run=2")
  assert local.returncode == 0, local.stderr
  lines = local.stdout.splitlines()
  assert len([x for x in lines if "eercl_jax.main" in x]) == 6
  assert "# 2 at a time: CUDA_VISIBLE_DEVICES='0,1', CUDA_VISIBLE_DEVICES='2,3'" in lines
  assert lines[-2].startswith(f"py -m eercl_jax.summarize --out={root}/summary {root}/source_raf")
  assert lines[-1].startswith(f"py -m eercl_jax.summarize --layout=groups "
                              f"--out={root}/summary_groups {root}/source_raf_seed1 ")


def test_bad_grids_are_one_line_errors(tmp_path):
  for args, text in [(["--sources=configs/nope.py"], "nope.py not found"),
                     (["--sources=configs/source_raf.py", "--seeds=1,1"], "repeated seeds"),
                     (["--sources=configs/source_raf.py", "--seeds=a"], "integers expected"),
                     (["--sources=configs/source_raf.py", "--devices=7", "--gpus_per_run=2"],
                      "only 1 GPUs")]:
    proc = _sweep(f"--root={tmp_path}", *args, "--dry_run")
    assert proc.returncode != 0 and text in proc.stderr, (args, proc.stderr)
    assert "Traceback" not in proc.stderr
  # Submitting where there is no SLURM: one line, nothing half-submitted.
  proc = _sweep(*_grid_args(tmp_path / "p"), "--mode=slurm", env={"PATH": "/usr/bin:/bin"})
  assert proc.returncode != 0 and "sbatch not found" in proc.stderr, proc.stderr
  assert "Traceback" not in proc.stderr


VARIANTS = "no_rel:adapt.class_contrast_weight=0;no_nce:adapt.instance_nce_weight=0,adapt.k=3"


def test_methods_and_variants_are_rows_of_the_grid(tmp_path):
  """--methods x (the method itself + each --variants entry) x sources x targets x seeds: each
  adaptation run gets --config.method and its variant's overrides; every run is printed."""
  root = tmp_path / "paper"
  args = [*_grid_args(root), "--methods=source_only,eercl", f"--variants={VARIANTS}"]
  proc = _sweep(*args, "--mode=slurm", "--dry_run")
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  commands = [l for l in out.splitlines() if "eercl_jax.main" in l and "--config.method" in l]
  assert len(commands) == 2 * 2 * 3 * 2     # targets x methods x (base + 2 variants) x seeds
  extra = {"": "", "-no_rel": " --config.adapt.class_contrast_weight=0",
           "-no_nce": " --config.adapt.instance_nce_weight=0 --config.adapt.k=3"}
  for tgt in ("ck", "jaffe"):
    for method in ("source_only", "eercl"):
      for variant, overrides in extra.items():
        label = f"raf2{tgt}_{method}{variant}"
        assert f"# array {label}:" in out
        for seed in (1, 2):
          assert (f"--workdir={root}/{label}_seed{seed} --config.seed={seed} "
                  f"--config.source_checkpoint={root}/source_raf_seed{seed} "
                  f"--config.method={method}{overrides}   (after source_raf task {seed - 1}") in out
        assert f"--job-name=eercl_{label} " in out
  sbatch = [l for l in out.splitlines() if l.startswith("sbatch")]
  assert len(sbatch) == 1 + 12 + 1
  assert all("--config.method" not in l for l in out.splitlines() if "source_raf.py" in l)

  local = _sweep(*args, "--dry_run", "--devices=cpu:2")
  assert local.returncode == 0, local.stderr
  assert len([l for l in local.stdout.splitlines() if "eercl_jax.main" in l]) == 2 + 24
  assert f"{root}/raf2jaffe_eercl-no_nce_seed2 " in local.stdout
  # Variants without --methods: the configs' own method, named after the pair.
  proc = _sweep(*_grid_args(root), "--variants=no_rel:adapt.class_contrast_weight=0",
                "--dry_run", "--devices=cpu:1")
  assert proc.returncode == 0, proc.stderr
  assert f"--workdir={root}/raf2ck-no_rel_seed1 " in proc.stdout
  assert f"--workdir={root}/raf2ck_seed1 " in proc.stdout
  assert "--config.method" not in proc.stdout


def test_bad_methods_and_variants_are_one_line_errors(tmp_path):
  for args, text in [(["--methods=eercl,eercl"], "repeated"),
                     (["--methods=e-rcl"], "--methods"),
                     (["--variants=no_rel"], "NAME:KEY=VALUE"),
                     (["--variants=a:x=1;a:y=2"], "repeated"),
                     (["--variants=a-b:x=1"], "--variants"),
                     (["--variants=a:novalue"], "KEY=VALUE")]:
    proc = _sweep(*_grid_args(tmp_path), *args, "--dry_run", "--devices=cpu:1")
    assert proc.returncode == 2 and text in proc.stderr, (args, proc.stderr)
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def _fake_bin(folder, name, body):
  path = folder / name
  path.write_text("#!/usr/bin/env bash\n" + body)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_submission_chains_the_arrays_with_real_job_ids(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  calls = tmp_path / "calls"
  # A fake sbatch: records its arguments, answers job ids 101, 102, ... as --parsable does.
  _fake_bin(bin_dir, "sbatch", f'n=$(( $(cat {calls} 2>/dev/null | wc -l) + 101 ))\n'
            f'printf "%s\\n" "$*" >> {calls}\necho "$n;cluster"\n')
  root = tmp_path / "paper"
  proc = _sweep(*_grid_args(root), "--mode=slurm", "--max_parallel=3",
                "--sbatch_args=--partition=gpu --time=2:00:00",
                env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
  assert proc.returncode == 0, proc.stderr
  submitted = calls.read_text().splitlines()
  assert len(submitted) == 4
  assert all("--partition=gpu --time=2:00:00" in line for line in submitted[:3])
  assert "--array=0-1%3" in submitted[0]
  assert "--dependency=aftercorr:101" in submitted[1] and "--dependency=aftercorr:101" in submitted[2]
  assert "--dependency=afterany:101:102:103" in submitted[3]
  # The summary's run folders, in the grid's order.
  assert (root / "sweep" / "runs.txt").read_text().splitlines() == [
      f"{root}/{name}" for name in ("source_raf_seed1", "source_raf_seed2", "raf2ck_seed1",
                                    "raf2ck_seed2", "raf2jaffe_seed1", "raf2jaffe_seed2")]
  # The task files: line i = array task i (workdir, tab, command); adaptation i <- source i.
  source_tasks = (root / "sweep" / "source_raf.tsv").read_text().splitlines()
  ck_tasks = (root / "sweep" / "raf2ck.tsv").read_text().splitlines()
  for i, (s, a) in enumerate(zip(source_tasks, ck_tasks)):
    s_dir, s_cmd = s.split("\t")
    a_dir, a_cmd = a.split("\t")
    assert s_dir == f"{root}/source_raf_seed{i + 1}" and f"--config.seed={i + 1}" in s_cmd
    assert a_dir == f"{root}/raf2ck_seed{i + 1}" and f"--config.source_checkpoint={s_dir}" in a_cmd


def _fake_sbatch(tmp_path):
  """A fake sbatch on PATH: appends its argv (JSON) to a file, answers job ids 101, 102, ...;
  returns (environment, the calls file)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  calls = tmp_path / "sbatch_calls.jsonl"
  _fake_bin(bin_dir, "sbatch",
            f'n=$(( $(cat {calls} 2>/dev/null | wc -l) + 101 ))\n'
            f'python3 -c "import json, sys; print(json.dumps(sys.argv[1:]))" "$@" >> {calls}\n'
            'echo "$n;cluster"\n')
  return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}, calls


def _submitted(calls):
  """Each sbatch call: its job id, argv and --options as a dict."""
  out = []
  for n, line in enumerate(calls.read_text().splitlines()):
    argv = json.loads(line)
    opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    out.append({"id": str(101 + n), "argv": argv, "opts": opts})
  return out


def _tasks(job):
  """The task file of an array submission, as [(workdir, command)]; checks that the array has
  one task per line."""
  with open(job["argv"][-1], encoding="utf-8") as f:
    lines = [line.split("\t") for line in f.read().splitlines()]
  last = re.fullmatch(r"0-(\d+)(%\d+)?", job["opts"]["array"]).group(1)
  assert int(last) + 1 == len(lines), (job["opts"]["job-name"], job["opts"]["array"], len(lines))
  return lines


def test_every_adaptation_task_waits_for_the_task_that_trains_its_own_source(tmp_path):
  """Two sources x two targets x two seeds: each adaptation task's aftercorr dependency is the
  task of the array that trains the source checkpoint it starts from."""
  env, calls = _fake_sbatch(tmp_path)
  root = tmp_path / "paper"
  proc = _sweep(f"--root={root}",
                "--sources=raf=configs/source_raf.py,r50=configs/source_raf_r50.py",
                "--targets=configs/adapt_ck.py,configs/adapt_jaffe.py", "--seeds=1,2",
                "--python=py", "--mode=slurm", env=env)
  assert proc.returncode == 0, proc.stderr
  jobs = _submitted(calls)
  arrays = [j for j in jobs if "array" in j["opts"]]
  tasks = {j["id"]: _tasks(j) for j in arrays}
  sources = [j for j in arrays if "dependency" not in j["opts"]]
  trained = sorted(workdir for j in sources for workdir, _ in tasks[j["id"]])
  assert trained == sorted(str(root / f"source_{s}_seed{k}") for s in ("raf", "r50")
                           for k in (1, 2))
  adaptations = [j for j in arrays if "dependency" in j["opts"]]
  assert len(adaptations) == 4
  pairs = set()
  for job in adaptations:
    kind, _, dep = job["opts"]["dependency"].partition(":")
    assert kind == "aftercorr" and dep in {j["id"] for j in sources}
    for i, (workdir, command) in enumerate(tasks[job["id"]]):
      start = re.search(r"--config\.source_checkpoint=(\S+)", command).group(1)
      source_dir, source_command = tasks[dep][i]
      assert source_dir == start, (job["opts"]["job-name"], i, source_dir, start)
      assert f"--workdir={start}" in source_command
      pairs.add((os.path.basename(workdir), os.path.basename(start)))
  assert len(pairs) == 8 and ("r502ck_seed2", "source_r50_seed2") in pairs
  # The summary waits for every array.
  summary = jobs[-1]
  assert summary["opts"]["dependency"] == "afterany:" + ":".join(j["id"] for j in arrays)


def _array_task(tmp_path, task, exit_code=0, env=None):
  """Runs launch/sweep.sbatch as SLURM would run array task `task`, with fake srun/scontrol and a
  fake python that records the command it was given (srun records the CPUs it gives the step)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  log = tmp_path / "log"
  _fake_bin(bin_dir, "srun", f'echo "srun cpus=${{SRUN_CPUS_PER_TASK:-unset}}" >> {log}\n'
            'while [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
  _fake_bin(bin_dir, "scontrol", f'echo "scontrol $*" >> {log}\n')
  _fake_bin(bin_dir, "py", f'echo "py $*" >> {log}\nexit {exit_code}\n')
  root = tmp_path / "paper"
  if not (root / "sweep").exists():
    the_grid = grid.build_grid(str(root), ["configs/source_raf.py"], ["configs/adapt_ck.py"],
                               [1, 2], python="py")
    (root / "sweep").mkdir(parents=True)
    grid.write_task_file(str(root / "sweep" / "raf2ck.tsv"), the_grid.array("raf2ck").runs)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_ARRAY_TASK_ID=str(task),
             SLURM_ARRAY_JOB_ID="77", SLURM_SUBMIT_DIR=REPO, **(env or {}))
  env.pop("SRUN_CPUS_PER_TASK", None)
  proc = subprocess.run(["bash", SBATCH, str(root / "sweep" / "raf2ck.tsv")], env=env,
                        capture_output=True, text=True, timeout=60)
  text = log.read_text() if log.exists() else ""
  return proc, "\n".join(l for l in text.splitlines() if not l.startswith("srun ")), root, text


def test_array_script_runs_the_task_of_its_index(tmp_path):
  proc, log, root, _ = _array_task(tmp_path, task=1)
  assert proc.returncode == 0, proc.stderr
  assert log.strip() == (f"py -m eercl_jax.main --config=configs/adapt_ck.py "
                         f"--workdir={root}/raf2ck_seed2 --config.seed=2 "
                         f"--config.source_checkpoint={root}/source_raf_seed2")


def test_array_script_gives_the_run_the_tasks_cpus(tmp_path):
  """srun does not inherit --cpus-per-task since SLURM 22.05: the scripts pass it on."""
  proc, _, _, full = _array_task(tmp_path, task=0, env={"SLURM_CPUS_PER_TASK": "16"})
  assert proc.returncode == 0 and "srun cpus=16" in full, (proc.stderr, full)
  # The multi-node script too.
  bin_dir = tmp_path / "bin"
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_CPUS_PER_TASK="8",
             SLURM_SUBMIT_DIR=REPO)
  env.pop("SRUN_CPUS_PER_TASK", None)
  _fake_bin(bin_dir, "python", f'echo "python $*" >> {tmp_path / "log"}\n')
  proc = subprocess.run(["bash", os.path.join(REPO, "launch", "slurm.sbatch"), "c.py", "w"],
                        env=env, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  text = (tmp_path / "log").read_text()
  assert "srun cpus=8" in text and "python -m eercl_jax.main --config=c.py --workdir=w" in text


def test_array_script_requeues_a_preempted_task_and_skips_a_finished_one(tmp_path):
  proc, log, root, _ = _array_task(tmp_path, task=0, exit_code=75)
  assert proc.returncode == 0 and "scontrol requeue 77_0" in log, (proc.stdout, log)
  (tmp_path / "log").unlink()
  (root / "raf2ck_seed1").mkdir()
  (root / "raf2ck_seed1" / "results.json").write_text("{}")
  proc, log, _, _ = _array_task(tmp_path, task=0)
  assert proc.returncode == 0 and log == "" and "finished already" in proc.stdout
  proc, log, _, _ = _array_task(tmp_path, task=1, exit_code=3)
  assert proc.returncode == 3 and "scontrol" not in log
  proc, _, _, _ = _array_task(tmp_path, task=5)
  assert proc.returncode == 2 and "no line for array task 5" in proc.stderr


def test_array_script_compares_the_recorded_command(tmp_path):
  """A run folder whose sweep_run.json records another command is neither skipped as finished
  nor resumed: the task fails naming both commands."""
  _, _, root, _ = _array_task(tmp_path, task=5)   # writes the task file only
  workdir = root / "raf2ck_seed1"
  workdir.mkdir()
  (workdir / "results.json").write_text("{}")
  line = (root / "sweep" / "raf2ck.tsv").read_text().splitlines()[0]
  argv = shlex.split(line.split("\t")[1])
  # The same command (another interpreter path is the same command): finished, skipped.
  (workdir / "sweep_run.json").write_text(json.dumps({"argv": ["/other/python"] + argv[1:]}))
  proc, log, _, _ = _array_task(tmp_path, task=0)
  assert proc.returncode == 0 and log == "" and "finished already" in proc.stdout, proc.stderr
  # Another command: refused, finished or not.
  (workdir / "sweep_run.json").write_text(json.dumps({"argv": argv + ["--config.lr=9"]}))
  for finished in (True, False):
    if not finished:
      (workdir / "results.json").unlink()
    proc, log, _, _ = _array_task(tmp_path, task=0)
    assert proc.returncode == 2 and log == "", (proc.stdout, proc.stderr, log)
    assert "--config.lr=9" in proc.stderr and "delete" in proc.stderr, proc.stderr
    assert str(workdir) in proc.stderr


def test_dependent_jobs_die_with_their_dependency_and_the_summary_is_small(tmp_path):
  env, calls = _fake_sbatch(tmp_path)
  root = tmp_path / "paper"
  gpu = "--partition=gpu --time=12:00:00"
  proc = _sweep(*_grid_args(root), "--mode=slurm", f"--sbatch_args={gpu}", env=env)
  assert proc.returncode == 0, proc.stderr
  jobs = _submitted(calls)
  for job in jobs:
    if "dependency" in job["opts"]:   # a failed source task cancels its waiting adaptations
      assert job["opts"].get("kill-on-invalid-dep") == "yes", job["argv"]
  summary = jobs[-1]
  assert summary["opts"]["job-name"] == "eercl_summary"
  assert "partition" not in summary["opts"] and "gpus" not in summary["opts"]
  assert summary["opts"]["time"] != "12:00:00" and summary["opts"]["cpus-per-task"] == "1"
  assert all(job["opts"]["partition"] == "gpu" for job in jobs[:-1])
  # Its own arguments, when given.
  calls.unlink()
  proc = _sweep(*_grid_args(tmp_path / "other"), "--mode=slurm", f"--sbatch_args={gpu}",
                "--summary_sbatch_args=--partition=cpu --time=0:10:00", env=env)
  assert proc.returncode == 0, proc.stderr
  summary = _submitted(calls)[-1]
  assert summary["opts"]["partition"] == "cpu" and summary["opts"]["time"] == "0:10:00"
  assert "gpus" not in summary["opts"]


def test_a_changed_sweep_is_refused_by_name(tmp_path):
  """Each run records the command it was submitted (or started) with; a sweep that would give it
  another one stops before submitting or running anything, naming the run, both commands and
  the way out; the same sweep again is accepted."""
  env, calls = _fake_sbatch(tmp_path)
  root = tmp_path / "paper"
  proc = _sweep(*_grid_args(root), "--mode=slurm", env=env)
  assert proc.returncode == 0, proc.stderr
  first = len(calls.read_text().splitlines())
  for array in ("source_raf", "raf2ck", "raf2jaffe"):
    for line in (root / "sweep" / f"{array}.tsv").read_text().splitlines():
      workdir, command = line.split("\t")
      record = json.loads((tmp_path / workdir / "sweep_run.json").read_text())
      assert record["argv"] == shlex.split(command) and record["name"] == os.path.basename(workdir)
  # The same sweep again: accepted (resubmitted).
  proc = _sweep(*_grid_args(root), "--mode=slurm", env=env)
  assert proc.returncode == 0, proc.stderr
  submitted = len(calls.read_text().splitlines())
  assert submitted == 2 * first
  (root / "source_raf_seed1" / "results.json").write_text("{}")   # finished, as it happens
  for mode in (["--mode=slurm"], ["--mode=slurm", "--dry_run"], ["--dry_run", "--devices=cpu:1"]):
    proc = _sweep(*_grid_args(root), "--source_args=--config.num_steps=5", *mode, env=env)
    assert proc.returncode == 2, (mode, proc.stdout, proc.stderr)
    err = proc.stderr
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "source_raf_seed1" in err and "source_raf_seed2" in err and "raf2ck" not in err
    assert "--config.num_steps=5" in err and "delete" in err and "--root" in err
    assert "finished already" not in proc.stdout
  assert len(calls.read_text().splitlines()) == submitted   # nothing submitted
  # The same sweep with a relative root: the same runs.
  proc = _sweep(f"--root={os.path.relpath(root, REPO)}", *_grid_args(root)[1:],
                "--dry_run", "--devices=cpu:1", env=env)
  assert proc.returncode == 0 and "[finished: skipped]" in proc.stdout, proc.stderr


def test_local_runner_records_each_runs_command(tmp_path):
  root = tmp_path / "grid"
  run = grid.Job("one", str(root / "one"), (sys.executable, "-c", "pass"))
  assert grid.run_local(str(root), [run], [{"CUDA_VISIBLE_DEVICES": ""}], dry_run=False,
                        poll_s=0.05) == 0
  record = json.loads((root / "one" / "sweep_run.json").read_text())
  assert record["argv"] == list(run.argv) and record["name"] == "one"
  other = grid.Job("one", str(root / "one"), (sys.executable, "-c", "print(1)"))
  with pytest.raises(UserError, match="one.*print"):
    grid.run_local(str(root), [other], [{"CUDA_VISIBLE_DEVICES": ""}], dry_run=True)


# A stand-in for a training run: SIGTERM -> "finish the step, checkpoint" (1 s), exit 75; it
# notes every SIGTERM it gets (the real run stops at once on a second one).
FAKE_RUN = """
import os, signal, sys, time
log = sys.argv[1]
def note(text):
  with open(log, "a") as f:
    f.write(text + "\\n")
got = []
signal.signal(signal.SIGTERM, lambda *_: (got.append(1), note("SIGTERM")))
note(f"pid {os.getpid()}")
deadline = time.time() + 60
while not got and time.time() < deadline:
  time.sleep(0.05)
end = time.time() + 1.0
while got and time.time() < end:
  time.sleep(0.05)
note(f"exit 75 after {len(got)} SIGTERM" if got else "not stopped")
sys.exit(75 if got else 1)
"""

def _start_runner(tmp_path, count, **popen):
  """A local sweep runner (its own process) running `count` fake runs at once; returns the
  runner, the runs' note files and their pids."""
  logs = [tmp_path / f"run{i}.notes" for i in range(count)]
  script = "\n".join([
      "import sys",
      "from eercl_jax import grid",
      f"fake = {FAKE_RUN!r}",
      "root, logs = sys.argv[1], sys.argv[2:]",
      "runs = [grid.Job(f'run{i}', f'{root}/run{i}', (sys.executable, '-c', fake, log))",
      "        for i, log in enumerate(logs)]",
      "sys.exit(grid.run_local(root, runs, [{}] * len(runs), dry_run=False, poll_s=0.05))"])
  runner = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "grid"),
                             *map(str, logs)], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
  pids = []
  deadline = time.time() + 60
  for log in logs:
    while not (log.exists() and log.read_text().startswith("pid ")):
      assert time.time() < deadline and runner.poll() is None, runner.communicate()
      time.sleep(0.05)
    pids.append(int(log.read_text().split()[1]))
  return runner, logs, pids


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  with open(f"/proc/{pid}/stat", encoding="utf-8") as f:   # a zombie is not running
    return f.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG)")
def test_a_killed_runner_takes_its_runs_with_it(tmp_path):
  """SIGKILL of the runner: its running child gets SIGTERM (the parent-death signal),
  checkpoints and exits 75, instead of training on unattended."""
  runner, logs, pids = _start_runner(tmp_path, 1)
  try:
    runner.kill()
    runner.wait(timeout=30)
    deadline = time.time() + 20
    while _alive(pids[0]) and time.time() < deadline:
      time.sleep(0.1)
    assert not _alive(pids[0]), "the run outlived its killed runner"
    assert logs[0].read_text().splitlines()[1:] == ["SIGTERM", "exit 75 after 1 SIGTERM"]
  finally:
    for pid in pids:
      if _alive(pid):
        os.kill(pid, signal.SIGKILL)


def test_a_signal_to_the_runners_group_reaches_each_run_once(tmp_path):
  """Ctrl-C or scancel signal the whole process group: each run gets one SIGTERM (the runner's)
  and exits 75 after its checkpoint, not a second one that would stop it at once."""
  runner, logs, pids = _start_runner(tmp_path, 2, start_new_session=True)
  try:
    os.killpg(runner.pid, signal.SIGTERM)
    out, _ = runner.communicate(timeout=60)
    assert runner.returncode == constants.EXIT_PREEMPTED, out
    for i, log in enumerate(logs):
      assert log.read_text().splitlines()[1:] == ["SIGTERM", "exit 75 after 1 SIGTERM"], i
      assert f"interrupted: run{i} (exit 75" in out
  finally:
    for pid in pids:
      if _alive(pid):
        os.kill(pid, signal.SIGKILL)
    if runner.poll() is None:
      runner.kill()


def _wait_for(path, text, proc, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if path.exists() and text in path.read_text():
      return
    assert proc.poll() is None, f"the runner ended early: {proc.communicate()}"
    time.sleep(0.5)
  raise AssertionError(f"{text!r} not in {path} after {timeout} s")


@pytest.mark.slow
def test_single_node_runner_interrupted_rerun_and_summarised(data_dir, tmp_path):
  """Two methods x one target on the synthetic data, two CPU runs at a time: SIGTERM while an
  adaptation runs, rerun: finished runs are skipped, the others resume, and the sweep ends with
  the paper's table - methods by targets, the source-only row first."""
  root = tmp_path / "grid"
  flags = " ".join(["--config.num_steps=6", "--config.log_every=3",
                    "--config.eval_every=3", "--config.checkpoint_every=3"])
  target = f"{REPO}/configs/demo_adapt.py:runlocal"
  args = [sys.executable, "-m", "eercl_jax.sweep", f"--root={root}",
          f"--sources=demo={REPO}/configs/demo_source.py:runlocal",
          f"--targets=wild={target}", "--methods=eercl,tent", "--seeds=1",
          "--devices=cpu:2", f"--source_args={flags}", f"--adapt_args={flags}"]
  env = dict(os.environ, PYTHONPATH=REPO)
  out = tmp_path / "runner.out"
  with open(out, "w", encoding="utf-8") as f:
    proc = subprocess.Popen(args, cwd=data_dir, env=env, stdout=f, stderr=subprocess.STDOUT)
  try:
    _wait_for(out, "start: demo2wild_eercl_seed1", proc)
    first = "demo2wild_eercl_seed1"
    _wait_for(root / "logs" / f"{first}.log", "step 3/", proc)   # the progress line
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == constants.EXIT_PREEMPTED
  finally:
    if proc.poll() is None:
      proc.kill()
  text = out.read_text()
  assert "finished: source_demo_seed1" in text
  assert f"interrupted: {first}" in text

  rerun = subprocess.run(args, cwd=data_dir, env=env, capture_output=True, text=True,
                         timeout=900)
  assert rerun.returncode == 0, rerun.stdout + rerun.stderr
  assert "finished already: source_demo_seed1" in rerun.stdout
  assert "start: source_demo" not in rerun.stdout
  assert "resumed from" in (root / "logs" / f"{first}.log").read_text()
  runs = ["source_demo_seed1"] + [f"demo2wild_{m}_seed1" for m in ("eercl", "tent")]
  for name in runs:
    assert (root / name / "results.json").is_file(), name
  results = {m: json.loads((root / f"demo2wild_{m}_seed1" / "results.json").read_text())
             for m in ("eercl", "tent")}
  assert {m: r["method"] for m, r in results.items()} == {"eercl": "eercl", "tent": "tent"}
  table = (root / "summary.md").read_text()      # the paper's layout: methods by targets
  assert "| method | wild | Mean |" in table, table
  rows = [line.split(" | ")[0].strip("| ") for line in table.splitlines()
          if line.startswith("| ") and not line.startswith("| method")]
  assert rows[:3] == ["source_only", "eercl", "tent"], rows
  cell = lambda m: round(100 * results[m]["lists"]["target"]["last"]["accuracy"], 2)
  for m in ("eercl", "tent"):   # one seed: the cell is that run's last-step accuracy
    assert f"{cell(m):.2f}" in [line for line in table.splitlines()
                                if line.startswith(f"| {m} ")][0]
  groups = (root / "summary_groups.md").read_text()
  assert "demo2wild_eercl" in groups and "source_demo" in groups
  for name in ("summary.csv", "summary.tex", "summary_groups.csv"):
    assert (root / name).is_file(), name
