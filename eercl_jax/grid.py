"""A paper table as one grid of runs: sources x targets x methods x variants x seeds, then the
summary tables (the command: `python -m eercl_jax.sweep`, eercl_jax/tools/sweep.py).

    python -m eercl_jax.sweep --root=runs/paper --sources=configs/source_raf.py \
        --targets=configs/adapt_ck.py,configs/adapt_jaffe.py --seeds=1,2,3 --mode=slurm

The method's recipe is 64 images per step, so a cluster serves it best by running many small runs
at once. Every run is named after its configs and seed:

    ROOT/source_<src>_seed<k>        the source run of seed k
    ROOT/<src>2<tgt>_seed<k>         its adaptation to <tgt>, started from ROOT/source_<src>_seed<k>

With `--methods=tent,shot,eercl` every adaptation runs once per method (`--config.method=<m>`)
as ROOT/<src>2<tgt>_<m>_seed<k>; with `--variants='no_nce:adapt.instance_nce_weight=0;...'` once
more per variant (its overrides appended) as ROOT/<src>2<tgt>_<m>-<variant>_seed<k>: the rows of
the paper's table (methods and ablations) by its columns (targets).

`--mode=slurm` submits, per source config, its runs (one per seed) as one SLURM array, and per
source, target, method and variant the adaptation runs (one per seed) as an array whose task i waits
for task i of its own source's array, the run of the same seed (`--dependency=aftercorr`), then a
summary job with its own small resources. A task whose source task failed is cancelled
(`--kill-on-invalid-dep`), so nothing waits forever. `--mode=local` runs the same grid on this
machine, one run per GPU (or per group of `--gpus_per_run` GPUs), queueing the rest. Both skip runs
that finished (their `results.json` exists) and resume interrupted ones (rerunning a run's command
resumes its workdir). Each run folder records the command the sweep gave it (RUN_FILE,
sweep_run.json); a sweep that would give a run another command (other --source_args, another config)
refuses, naming the runs, instead of reporting the old results as its own. At the end `python -m
eercl_jax.summarize` writes the paper's table (methods by targets) as ROOT/summary.{md,csv,tex} and
the per-group table as ROOT/summary_groups.{md,csv}. `--dry_run` prints every command and dependency
and runs nothing.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from typing import Callable, Optional, Sequence

from eercl_jax import constants
from eercl_jax.errors import UserError

SBATCH_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "launch", "sweep.sbatch")


def sbatch_script() -> str:
  """The array task script: launch/sweep.sbatch of the clone the package runs from (in place or
  `pip install -e .`); a copy installed by `pip install .` has no launch/ beside it, so then the
  working directory's (a clone's root)."""
  here = os.path.abspath(os.path.join("launch", "sweep.sbatch"))
  return SBATCH_SCRIPT if os.path.isfile(SBATCH_SCRIPT) or not os.path.isfile(here) else here


# What a run was started with, in its workdir: written when the sweep submits (slurm) or starts
# (local) the run, compared whenever a sweep meets the run again (here and in launch/sweep.sbatch,
# which names the file too), read by the results tables for the run's labels.
RUN_FILE = constants.SWEEP_RUN_FILE


@dataclasses.dataclass(frozen=True)
class Job:
  name: str                      # the run's folder name under the root
  workdir: str
  argv: tuple[str, ...]          # the command
  after: Optional[str] = None    # the name of the run it starts from
  # Its place in the grid (recorded in RUN_FILE for the tables).
  stage: str = "adapt"
  source: Optional[str] = None
  target: Optional[str] = None
  method: Optional[str] = None   # None: the config's own
  variant: Optional[str] = None
  seed: Optional[int] = None

  def command(self) -> str:
    return shlex.join(self.argv)

  def finished(self) -> bool:
    return os.path.isfile(os.path.join(self.workdir, constants.RESULTS_FILE))

  def record(self) -> dict:
    return {"name": self.name, "argv": list(self.argv), "command": self.command(),
            "stage": self.stage, "source": self.source, "target": self.target,
            "method": self.method, "variant": self.variant, "seed": self.seed,
            "after": self.after}


def same_command(old: Sequence[str], new: Sequence[str]) -> bool:
  """Whether two runs' commands compute the same thing: equal but for the interpreter's path (a
  rerun from another virtual environment is the same run)."""
  return list(old[1:]) == list(new[1:])


def recorded(run: Job) -> Optional[dict]:
  """The run's RUN_FILE, None when there is none (never started by a sweep)."""
  path = os.path.join(run.workdir, RUN_FILE)
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
    if not isinstance(record.get("argv"), list):
      raise ValueError("no 'argv' list")
  except (OSError, ValueError, AttributeError) as e:
    return {"argv": [], "command": f"<unreadable {path}: {e}>"}
  return record


def check_records(runs: Sequence[Job]) -> None:
  """Raises a UserError naming every run whose folder records another command than the one
  this sweep would give it: its results or checkpoints belong to that command, so the run is
  neither reported as finished nor resumed."""
  changed = []
  for run in runs:
    record = recorded(run)
    if record is not None and not same_command(record["argv"], run.argv):
      changed.append((run, record.get("command") or shlex.join(record["argv"])))
  if not changed:
    return
  shown = "; ".join(f"{run.name} ({run.workdir}) was started with `{old}`, this sweep gives it "
                    f"`{run.command()}`" for run, old in changed[:3])
  more = f"; and {len(changed) - 3} more" if len(changed) > 3 else ""
  raise UserError(
      f"{len(changed)} run(s) of this sweep were started with other commands: {shown}{more}. "
      f"Their folders hold that command's results and checkpoints: delete those run folders to "
      f"run them with the new command, or give the changed sweep another --root.")


def write_record(run: Job) -> None:
  os.makedirs(run.workdir, exist_ok=True)
  path = os.path.join(run.workdir, RUN_FILE)
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(run.record(), f, indent=2)
    f.write("\n")
  os.replace(tmp, path)


def write_records(runs: Sequence[Job]) -> None:
  """Records the command of every run about to be submitted; a finished run without a record
  (from before records, or run by hand) is left as it is: its command is not known."""
  for run in runs:
    if not run.finished() or recorded(run) is not None:
      write_record(run)


def _named(spec: str, prefix: str) -> tuple[str, str]:
  """'NAME=PATH[:ARG]' or 'PATH[:ARG]' -> (name, config argument). The default name is the file
  name with the values of its argument (configs/adapt.py:target=ck,backbone=resnet ->
  adapt_ck_resnet), without `prefix` (-> ck_resnet)."""
  named = re.match(r"^([\w.-]+)=(.+)$", spec)
  if named and not named.group(1).endswith(".py"):
    name, path = named.groups()
  else:
    path = spec
    file, _, arg = path.partition(":")
    parts = [os.path.splitext(os.path.basename(file))[0]]
    parts += [item.split("=", 1)[-1] for item in arg.split(",") if item.strip()]
    name = re.sub(r"[^\w.-]+", "-", "_".join(parts))
    name = name[len(prefix):] if name.startswith(prefix) else name
  file = path.partition(":")[0]
  if not name or not file.endswith(".py"):
    raise UserError(f"{spec!r}: expected a config file PATH.py[:ARG] or NAME=PATH.py[:ARG]")
  if not os.path.isfile(file):
    raise UserError(f"{spec!r}: config file {file} not found")
  return name, path


@dataclasses.dataclass(frozen=True)
class Array:
  """Runs submitted as one SLURM array: task i is runs[i]. An adaptation array waits task by
  task for the source array `after` (`--dependency=aftercorr`): its task i starts from the run
  of task i of that array (build_grid makes both follow the seeds)."""
  label: str                     # ROOT/sweep/<label>.tsv, job name eercl_<label>
  runs: tuple[Job, ...]
  after: Optional[str] = None    # the label of the source array


@dataclasses.dataclass(frozen=True)
class Grid:
  root: str
  arrays: tuple[Array, ...]      # the source arrays first

  def runs(self) -> list[Job]:
    """Every run, each source run before the adaptations that start from it."""
    return [run for array in self.arrays for run in array.runs]

  def array(self, label: str) -> Array:
    return next(a for a in self.arrays if a.label == label)


_NAME = re.compile(r"^[A-Za-z][\w.]*$")          # a method or variant: no '-' (a name separator)
_OVERRIDE = re.compile(r"^([A-Za-z_][\w.]*)=(.*)$")


def parse_methods(methods: Sequence[str]) -> list[str]:
  methods = [m.strip() for m in methods if m.strip()]
  for m in methods:
    if not _NAME.match(m):
      raise UserError(f"--methods: {m!r} is not a method name (letters, digits, '_', '.')")
  if len(set(methods)) != len(methods):
    raise UserError(f"--methods: repeated methods in {methods}")
  return methods


def parse_variants(text: str) -> list[tuple[str, tuple[str, ...]]]:
  """'NAME:KEY=VALUE,KEY=VALUE;NAME:...' -> [(name, ('--config.KEY=VALUE', ...))]."""
  variants = []
  for item in (i.strip() for i in (text or "").split(";")):
    if not item:
      continue
    name, sep, body = item.partition(":")
    name = name.strip()
    if not sep or not body.strip():
      raise UserError(f"--variants: {item!r}: expected NAME:KEY=VALUE[,KEY=VALUE...]")
    if not _NAME.match(name):
      raise UserError(f"--variants: {name!r} is not a variant name (letters, digits, '_', '.')")
    overrides = []
    for pair in (p.strip() for p in body.split(",")):
      if not _OVERRIDE.match(pair):
        raise UserError(f"--variants: {name}: {pair!r}: expected KEY=VALUE (a config key)")
      overrides.append(f"--config.{pair}")
    variants.append((name, tuple(overrides)))
  names = [n for n, _ in variants]
  if len(set(names)) != len(names):
    raise UserError(f"--variants: repeated names in {names}")
  return variants


def build_grid(root: str, sources: Sequence[str], targets: Sequence[str], seeds: Sequence[int],
               python: str = sys.executable, source_args: str = "", adapt_args: str = "",
               methods: Sequence[str] = (), variants: str = "") -> Grid:
  """One source array per source config (a task per seed) and, per source, target, method and
  variant, one adaptation array whose task i starts from task i of its source's array (the same
  seed). A method is `--config.method=<name>` on the adaptation's command (none given: the
  config's own, and the names carry none); a variant (`parse_variants`) is a row of its own
  beside the method's, its overrides appended last."""
  if not sources:
    raise UserError("--sources: at least one source config is needed")
  # Absolute: the recorded commands then name the same folders from wherever the sweep is
  # started again (a relative and an absolute --root are one sweep).
  root = os.path.abspath(root)
  if len(set(seeds)) != len(seeds):
    raise UserError(f"--seeds: repeated seeds in {list(seeds)}")
  src = [_named(s, "source_") for s in sources]
  tgt = [_named(t, "adapt_") for t in targets]
  for kind, named in (("source", src), ("target", tgt)):
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
      raise UserError(f"two {kind} configs share a name in {names}: name them NAME=PATH")
  ablations = parse_variants(variants)
  rows = []   # (method, variant, the overrides that make the row)
  for method in parse_methods(methods) or [None]:
    base = (f"--config.method={method}",) if method else ()
    rows.append((method, None, base))
    rows += [(method, name, base + extra) for name, extra in ablations]
  main = (python, "-m", "eercl_jax.main")
  arrays = []
  for s_name, s_path in src:
    runs = []
    for seed in seeds:
      name = f"source_{s_name}_seed{seed}"
      workdir = os.path.join(root, name)
      runs.append(Job(name, workdir, main + (f"--config={s_path}", f"--workdir={workdir}",
                                             f"--config.seed={seed}",
                                             *shlex.split(source_args)),
                      stage="source", source=s_name, seed=seed))
    arrays.append(Array(f"source_{s_name}", tuple(runs)))
  for t_name, t_path in tgt:
    for s_name, _ in src:
      for method, variant, overrides in rows:
        label = (f"{s_name}2{t_name}" + (f"_{method}" if method else "")
                 + (f"-{variant}" if variant else ""))
        runs = []
        for seed in seeds:
          source = os.path.join(root, f"source_{s_name}_seed{seed}")
          name = f"{label}_seed{seed}"
          workdir = os.path.join(root, name)
          runs.append(Job(
              name, workdir, main + (f"--config={t_path}", f"--workdir={workdir}",
                                     f"--config.seed={seed}",
                                     f"--config.source_checkpoint={source}",
                                     *shlex.split(adapt_args), *overrides),
              after=f"source_{s_name}_seed{seed}", source=s_name, target=t_name,
              method=method, variant=variant, seed=seed))
        arrays.append(Array(label, tuple(runs), after=f"source_{s_name}"))
  labels = [a.label for a in arrays]
  if len(set(labels)) != len(labels):
    raise UserError(f"two arrays share a name in {labels}: name the configs NAME=PATH")
  return Grid(root, tuple(arrays))


def summary_argvs(root: str, runs: Sequence[str], python: str = sys.executable) -> list[list[str]]:
  """The summary commands over the grid's run folders, in the grid's order (the table's rows
  and columns follow it; unfinished runs are listed as missing): the paper's layout (methods by
  targets, at the last step) as ROOT/summary.{md,csv,tex}, the per-group table of every list as
  ROOT/summary_groups.{md,csv}. `runs` may be ['@FILE'], a file of run folders."""
  summarize = [python, "-m", "eercl_jax.summarize"]
  return [summarize + [f"--out={os.path.join(root, 'summary')}", *runs],
          summarize + ["--layout=groups", f"--out={os.path.join(root, 'summary_groups')}", *runs]]


# -------------------------------------------------------------------------------------- SLURM


def write_task_file(path: str, runs: Sequence[Job]) -> None:
  """One line per array task: workdir, a tab, the command (shell-quoted)."""
  with open(path, "w", encoding="utf-8") as f:
    for run in runs:
      if "\t" in run.workdir or "\n" in run.command():
        raise UserError(f"{run.name}: tabs or newlines in the workdir or command")
      f.write(f"{run.workdir}\t{run.command()}\n")


# The run folders of the grid, one a line, in its order: what the summary job summarises.
RUNS_FILE = "runs.txt"
# The summary job reads a few JSON files: one CPU for minutes, whatever the runs' arrays ask.
SUMMARY_SBATCH_ARGS = "--ntasks=1 --cpus-per-task=1 --mem=2G --time=00:30:00"


def slurm_plan(grid: Grid, *, gpus_per_run: int, sbatch_args: str, max_parallel: int,
               python: str, summary_sbatch_args: str = SUMMARY_SBATCH_ARGS
               ) -> list[tuple[str, list[str]]]:
  """The sbatch calls, in order, as (array label, argv): the source arrays, the adaptation
  arrays, the summary. '{label}' in a dependency is filled in with that array's job id when it
  is submitted. Array sizes are the task files' line counts; the task i of an adaptation array
  waits for task i of its source's array (aftercorr), which trains the run it starts from.
  A job whose dependency can no longer be met (its source task failed or was cancelled) is
  cancelled (--kill-on-invalid-dep) rather than left pending, so that the summary, which waits
  for every array to end (afterany), runs."""
  root = grid.root
  sweep_dir = os.path.join(root, "sweep")
  logs = os.path.join(root, "logs")
  throttle = f"%{max_parallel}" if max_parallel else ""
  common = ["sbatch", "--parsable", f"--gpus={gpus_per_run}", *shlex.split(sbatch_args)]
  script = sbatch_script()
  plan = []
  for array in grid.arrays:
    if array.after:
      source = grid.array(array.after)
      for run, src in zip(array.runs, source.runs, strict=True):
        if run.after != src.name:   # the pairing aftercorr relies on
          raise AssertionError(f"{run.name} starts from {run.after}, not {src.name}")
    dep = (["--dependency=aftercorr:{" + array.after + "}", "--kill-on-invalid-dep=yes"]
           if array.after else [])
    plan.append((array.label, common + [f"--array=0-{len(array.runs) - 1}{throttle}", *dep,
                                        f"--job-name=eercl_{array.label}",
                                        f"--output={logs}/%x_%A_%a.out", script,
                                        os.path.join(sweep_dir, f"{array.label}.tsv")]))
  deps = ":".join("{" + a.label + "}" for a in grid.arrays)
  summarize = "; ".join(shlex.join(argv) for argv in summary_argvs(
      root, ["@" + os.path.join(sweep_dir, RUNS_FILE)], python))
  plan.append(("summary", ["sbatch", "--parsable", *shlex.split(summary_sbatch_args),
                           f"--dependency=afterany:{deps}", "--kill-on-invalid-dep=yes",
                           "--job-name=eercl_summary",
                           f"--output={logs}/summary_%j.out", f"--wrap={summarize}"]))
  return plan


def _fill(arg: str, ids: dict) -> str:
  for label, job in ids.items():
    arg = arg.replace("{" + label + "}", job)
  return arg


def submit_slurm(grid: Grid, *, dry_run: bool, **plan_kwargs) -> None:
  """Writes the task files and every run's RUN_FILE, then submits the plan (`dry_run`: prints
  it, writes nothing). A run recorded with another command stops it before anything is
  written or submitted."""
  runs = grid.runs()
  check_records(runs)
  plan = slurm_plan(grid, **plan_kwargs)
  for array in grid.arrays:
    print(f"# array {array.label}:")
    for i, run in enumerate(array.runs):
      dep = f"   (after {array.after} task {i}: {run.after})" if run.after else ""
      print(f"#   [{i}] {run.command()}{dep}")
  if not dry_run:
    if not os.path.isfile(sbatch_script()):
      raise UserError(f"{SBATCH_SCRIPT} not found: this installed copy has no launch/; run "
                      "--mode=slurm from a clone's root (or `pip install -e .` the clone)")
    os.makedirs(os.path.join(grid.root, "sweep"), exist_ok=True)
    os.makedirs(os.path.join(grid.root, "logs"), exist_ok=True)
    for array in grid.arrays:
      write_task_file(os.path.join(grid.root, "sweep", f"{array.label}.tsv"), array.runs)
    write_records(runs)
    with open(os.path.join(grid.root, "sweep", RUNS_FILE), "w", encoding="utf-8") as f:
      f.write("".join(f"{run.workdir}\n" for run in runs))
  ids = {}
  for label, argv in plan:
    argv = [_fill(a, ids) if a.startswith("--dependency=") else a for a in argv]
    if dry_run:
      print(shlex.join(argv))
      ids[label] = f"<{label} job id>"
      continue
    try:
      out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:
      raise UserError("sbatch not found: submit from a SLURM login node, or use "
                      "--mode=local / --dry_run") from None
    except subprocess.CalledProcessError as e:
      raise UserError(f"{shlex.join(argv)} failed ({e.returncode}): "
                      f"{e.stderr.strip()}") from None
    ids[label] = out.split(";")[0]
    print(f"{shlex.join(argv)}\n  -> job {ids[label]}")


# -------------------------------------------------------------------------------- one machine


def device_slots(devices: Optional[str], gpus_per_run: int) -> list[dict]:
  """Environment overrides of each slot: a group of GPUs, or a CPU slot with the GPUs hidden."""
  if devices and devices.startswith("cpu"):
    count = int(devices.split(":", 1)[1]) if ":" in devices else 1
    return [{"CUDA_VISIBLE_DEVICES": ""} for _ in range(count)]
  if devices:
    ids = [d.strip() for d in devices.split(",") if d.strip()]
  elif os.environ.get("CUDA_VISIBLE_DEVICES"):
    ids = os.environ["CUDA_VISIBLE_DEVICES"].split(",")
  else:
    try:
      listing = subprocess.run(["nvidia-smi", "-L"], check=True, capture_output=True,
                               text=True).stdout
      ids = [str(i) for i, line in enumerate(listing.splitlines()) if line.startswith("GPU")]
    except (OSError, subprocess.CalledProcessError):
      ids = []
  if not ids:
    raise UserError("--devices: no GPUs found; give GPU ids, or 'cpu:N' to run on the CPU")
  if len(ids) < gpus_per_run:
    raise UserError(f"--gpus_per_run={gpus_per_run} but only {len(ids)} GPUs: {ids}")
  groups = [ids[i:i + gpus_per_run] for i in range(0, len(ids) - gpus_per_run + 1, gpus_per_run)]
  return [{"CUDA_VISIBLE_DEVICES": ",".join(g)} for g in groups]


_PR_SET_PDEATHSIG = 1   # linux/prctl.h


def _parent_death_signal() -> Optional[Callable[[], None]]:
  """A `preexec_fn` that has the kernel send the child SIGTERM when the runner dies (even by
  SIGKILL): the run then checkpoints and exits 75 instead of training on unattended. None
  where prctl is not available (not Linux)."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    prctl = ctypes.CDLL(None, use_errno=True).prctl   # looked up here: the child only calls it
  except (OSError, AttributeError):
    return None
  runner = os.getpid()

  def setup() -> None:
    prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != runner:   # the runner died before the prctl: no signal will come
      raise RuntimeError("the sweep runner died before the run started")   # the child exits
  return setup


def run_local(root: str, runs: Sequence[Job], slots: Sequence[dict], *, dry_run: bool,
              poll_s: float = 0.5) -> int:
  """Runs `runs` (sources before the adaptations that need them), one per slot at a time.
  Returns 0 when every run finished, 75 when interrupted, 1 when some run failed.

  SIGINT/SIGTERM to the runner is forwarded to every running run as one SIGTERM (checkpoint,
  exit 75); a second one is forwarded again (the runs then stop at once). Runs start in their
  own session, so a signal to the runner's process group (Ctrl-C, scancel) reaches them only
  through the runner, once; and with a parent-death signal, so that a runner killed outright
  stops them too."""
  by_name = {r.name: r for r in runs}
  check_records(runs)
  if dry_run:
    for run in runs:
      dep = f"   (after {run.after})" if run.after else ""
      state = "   [finished: skipped]" if run.finished() else ""
      print(f"{run.command()}{dep}{state}")
    print(f"# {len(slots)} at a time: " + ", ".join(
        f"CUDA_VISIBLE_DEVICES={s['CUDA_VISIBLE_DEVICES']!r}" for s in slots))
    return 0
  os.makedirs(os.path.join(root, "logs"), exist_ok=True)
  done = {r.name for r in runs if r.finished()}
  for name in sorted(done):
    unknown = "" if recorded(by_name[name]) else " (no record of its command: not compared)"
    print(f"finished already: {name}{unknown}", flush=True)
  failed: set[str] = set()
  pending = [r for r in runs if r.name not in done]
  active: dict[str, tuple[subprocess.Popen, int]] = {}  # name -> (process, slot)
  stopping = []

  def stop(signum, _frame):
    stopping.append(signum)
    for proc, _ in active.values():
      proc.send_signal(signal.SIGTERM)  # each run checkpoints and exits 75

  previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    while pending or active:
      for name, (proc, slot) in list(active.items()):
        code = proc.poll()
        if code is None:
          continue
        del active[name]
        if code == 0:
          done.add(name)
          print(f"finished: {name}", flush=True)
        elif stopping:  # exit 75 after a checkpoint, or killed before it could write one
          print(f"interrupted: {name} (exit {code}; rerun to resume)", flush=True)
        elif code == constants.EXIT_PREEMPTED:
          pending.insert(0, by_name[name])  # stopped from outside: start it again
        else:
          failed.add(name)
          print(f"FAILED: {name} (exit {code}; see {root}/logs/{name}.log)", flush=True)
      if stopping:
        if not active:
          break
        time.sleep(poll_s)
        continue
      for run in [r for r in pending if r.after in failed]:
        pending.remove(run)
        failed.add(run.name)
        print(f"skipped: {run.name} (its source run {run.after} failed)", flush=True)
      free = [i for i in range(len(slots)) if i not in {s for _, s in active.values()}]
      for run in [r for r in pending if r.after is None or r.after in done]:
        if not free:
          break
        slot = free.pop(0)
        pending.remove(run)
        log = open(os.path.join(root, "logs", f"{run.name}.log"), "ab")  # pylint: disable=consider-using-with
        print(f"start: {run.name} on {slots[slot]}: {run.command()}", flush=True)
        write_record(run)
        proc = subprocess.Popen(  # pylint: disable=subprocess-popen-preexec-fn
            run.argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **slots[slot]},
            start_new_session=True, preexec_fn=_parent_death_signal())
        log.close()
        active[run.name] = (proc, slot)
      time.sleep(poll_s)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  if stopping:
    print("interrupted: rerun the same command to resume", flush=True)
    return constants.EXIT_PREEMPTED
  return 1 if failed else 0
