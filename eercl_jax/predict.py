"""`python -m eercl_jax.predict`: an alias of the command in eercl_jax/tools/predict.py (the
library is eercl_jax/inference.py)."""
if __name__ == "__main__":
  from eercl_jax.tools import predict
  predict.run()
