"""`python -m eercl_jax.summarize`: an alias of the command in eercl_jax/tools/summarize.py (the
library is eercl_jax/tables.py)."""
if __name__ == "__main__":
  from eercl_jax.tools import summarize
  summarize.run()
