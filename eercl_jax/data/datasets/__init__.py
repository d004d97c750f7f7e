"""Readers of the FER data sets' own layouts and label files, one module each, for
`eercl_jax.data.make_lists` (docs/datasets.md).

A reader module has SPLITS (its split names, or `splits(args)` where they depend on its options),
`read(src, args, ctx)` -> items, and optionally `add_args(parser)` for options of its own."""
