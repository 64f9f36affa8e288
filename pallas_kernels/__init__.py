"""Pallas kernels of condensate-jax. Depends only on jax (never on condensate_jax).

One folder per op (STYLE.md "Kernels"): reference.py (plain jnp, the spec), one file per
backend, api.py (`implementation=` dispatch, interpret mode on CPU), arg_specs.py (named
shape sets shared by tests and benchmarks).
"""
