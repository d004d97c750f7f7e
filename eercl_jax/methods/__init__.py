"""Source-free adaptation methods as plug-ins on the shared adaptation loop (train_adapt.py), one
module each (the interface: methods/base.py). `config.method` names one:

  eercl        this project's method (the default)
  source_only  the source model, not adapted (the table's first row)
  adabn        BN statistics re-estimated on the target, no gradient (Li et al., 2016)
  tent         entropy minimisation of the normalisation layers' affine (Wang et al., ICLR 2021)
  shot         information maximisation + clustering pseudo-labels, classifier frozen (Liang et
               al., ICML 2020)
  nrc          neighbourhood reciprocity clustering (Yang et al., NeurIPS 2021)
  aad          attracting and dispersing (Yang et al., NeurIPS 2022)

docs/method.md describes each, docs/deviations.md where each differs from its authors' code.
"""
from __future__ import annotations

import importlib

from eercl_jax.errors import ConfigError

NAMES = ("eercl", "source_only", "adabn", "tent", "shot", "nrc", "aad")


def create(config):
  """The method `config.method` names, built from the config's settings."""
  name = config.method
  if name not in NAMES:
    raise ConfigError(f"config.method: {name!r}: expected one of {', '.join(NAMES)}")
  return importlib.import_module(f"eercl_jax.methods.{name}").Method(config)
