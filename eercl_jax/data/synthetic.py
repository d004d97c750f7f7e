"""`python -m eercl_jax.data.synthetic`: an alias of the command in eercl_jax/tools/synthetic.py
(the library is eercl_jax/data/datasets/synthetic.py)."""
if __name__ == "__main__":
  from eercl_jax.tools import synthetic
  synthetic.run()
