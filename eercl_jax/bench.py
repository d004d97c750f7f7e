"""`python -m eercl_jax.bench`: an alias of the command in eercl_jax/tools/bench.py (the library
is eercl_jax/benchmarks.py, the settings configs/bench.py)."""
if __name__ == "__main__":
  from eercl_jax.tools import bench
  bench.run()
