"""Every command of eercl_jax, one module each; nothing outside this folder parses a command line
(except `eercl_jax/main.py`, the training entry point). A command parses its arguments, calls
library functions and prints; the logic it runs lives in the library, where tests and other
programs call it too.

    python -m eercl_jax.main          train either stage, or --config.mode=eval
    python -m eercl_jax.tools.X       any command below

The short names the docs use (`python -m eercl_jax.predict`, `eercl_jax.sweep`,
`eercl_jax.summarize`, `eercl_jax.bench`, `eercl_jax.data.pack`, `eercl_jax.data.make_lists`,
`eercl_jax.data.synthetic`) are aliases: each of those files only forwards to its tool here.
Every tool's `run()` is its process entry (exit codes: eercl_jax/constants.py).
"""
