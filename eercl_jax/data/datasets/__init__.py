"""Readers of the FER data sets' own layouts and label files, one module each, for
`eercl_jax.data.make_lists` (docs/datasets.md)."""
