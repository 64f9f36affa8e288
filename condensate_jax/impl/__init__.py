"""One module per `implementation=` value of `condensate_attention` (validated inputs in;
nothing here imports `condensate_jax.attention`).

xla_masked     "xla" / "xla_masked": dense scores, exact top-k, one masked softmax
xla_gathered   "xla_gathered": exact top-k, then the set's K/V rows gathered per query
xla_blocks     "xla" for block-selection specs: the XLA specification of the fast path
pallas_exact   "pallas": XLA exact selection, the gather-attention Pallas kernel
pallas_blocks  "pallas" for block-selection specs: the block-sparse Pallas kernels
"""
