"""Pallas kernels of condensate-jax. Depends only on jax (never on the model package).

One folder per op: reference.py (plain jnp, the spec), one file per backend, api.py
(`implementation=` dispatch, interpret mode on CPU), arg_specs.py where there are named
shape sets shared by tests and benchmarks. Ops: gather_attention, block_sparse
(block_decode, block_prefill, combine), block_bounds, block_rank (superblock_select,
rank_select), decode_step, index_scan. `util.py`: padding arithmetic and the api dispatch.
"""
