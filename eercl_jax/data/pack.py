"""`python -m eercl_jax.data.pack`: an alias of the command in eercl_jax/tools/pack.py (the library
is eercl_jax/data/packed.py)."""
if __name__ == "__main__":
  from eercl_jax.tools import pack
  pack.run()
