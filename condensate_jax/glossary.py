"""Axis letters used in names and einsums across condensate_jax.

B  batch                      T  query positions (this call)
S  key/value positions        D  model width (embedding)
H  head dim                   N  query heads (Hq)
K  key/value heads (Hkv)      G  query heads per KV head (N // K)
V  vocabulary                 F  MLP hidden width
L  layers                     P  keys per block (block summaries)

In attention functions the per-head feature axis is written `d` (lower case) and the
query/key heads as `Hq`/`Hkv`, following DESIGN.md §3: q [B, T, Hq, d], k/v [B, S, Hkv, d].
"""
