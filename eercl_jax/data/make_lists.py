"""`python -m eercl_jax.data.make_lists`: an alias of the command in eercl_jax/tools/make_lists.py
(the library is eercl_jax/data/datasets/build.py)."""
if __name__ == "__main__":
  from eercl_jax.tools import make_lists
  make_lists.run()
