"""Names shared by the library and the commands, kept free of jax so that light commands (the
seed table, the sweep's planner) can import them on a login node.

Exit codes of every command (`python -m eercl_jax.main`, `eercl_jax.tools.*`):
  0   done
  1   a failure that is not the user's input (a bug, a crash, a diverging run)
  2   a user mistake: a command-line error, a config key, a missing or malformed file; one line
      on stderr names it
  75  EX_TEMPFAIL, "try again later": a run stopped by SIGTERM/SIGINT after writing its
      checkpoint; rerunning the same command resumes (launch/slurm.sbatch requeues on it)
"""
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_PREEMPTED = 75

# Files of a run's workdir.
CONFIG_FILE = "config.json"      # the resolved config, rewritten at each start
RESULTS_FILE = "results.json"    # written when the run finishes (eercl_jax/records.py)
LOCK_FILE = "run.lock"           # held by process 0 for the run's lifetime
SWEEP_RUN_FILE = "sweep_run.json"   # the command a sweep gave the run (eercl_jax/grid.py)
