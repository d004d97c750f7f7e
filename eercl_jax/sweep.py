"""`python -m eercl_jax.sweep`: an alias of the command in eercl_jax/tools/sweep.py (the library is
eercl_jax/grid.py)."""
if __name__ == "__main__":
  from eercl_jax.tools import sweep
  sweep.run()
