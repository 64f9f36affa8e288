"""lm.hidden / lm.head / lm.hidden_parity: parity statistics without [T, V] logits."""

import numpy as np
import pytest

from condensate_jax import CondensateSpec, metrics
from condensate_jax.weights import tiny

FAMILIES = ["llamalike", "gemma3", "gpt2"]   # tied/untied heads, Gemma's norm and cap
SPEC = CondensateSpec(anchor=1, window=4, top_k=5)


def _bits(x):
  return np.asarray(x, np.float32).view(np.uint32)


@pytest.mark.parametrize("family", FAMILIES)
def test_head_of_hidden_is_logits_bitwise_and_parity_matches(family):
  lm = tiny.tiny_random(family)
  tokens = np.random.default_rng(0).integers(0, lm.vocab_size, (2, 37))
  dense, cond = lm.logits(tokens), lm.logits(tokens, attention=SPEC)
  h_dense = lm.hidden(tokens)
  h_cond, stats = lm.hidden(tokens, attention=SPEC, return_stats=True)
  assert h_dense.shape == (2, 37, lm.config.width) and h_dense.dtype == lm.dtype
  np.testing.assert_array_equal(_bits(lm.head(h_dense)), _bits(dense))
  np.testing.assert_array_equal(_bits(lm.head(h_cond)), _bits(cond))
  # some rows alone: another GEMM shape, so float rounding, not bits
  np.testing.assert_allclose(lm.head(h_cond[:, 5:9]), cond[:, 5:9], rtol=1e-5, atol=1e-5)
  _, want_stats = lm.logits(tokens, attention=SPEC, return_stats=True)
  np.testing.assert_array_equal(np.asarray(stats.set_size), np.asarray(want_stats.set_size))
  want = metrics.logit_parity_on_device(dense, cond)
  got = lm.hidden_parity(h_dense, h_cond, chunk=7)   # 74 rows: a ragged last chunk
  assert set(got) == set(want)
  # chunks of rows: the head's rounding may differ from the full logits', but a row whose
  # hidden states agree bitwise gives bitwise equal logits either way
  assert got["bitwise_frac"] == want["bitwise_frac"]
  assert got["top1_agreement"] == want["top1_agreement"]
  for key in ("max_abs_logit_diff", "mean_kl", "dense_max_abs_logit"):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-4, err_msg=key)
  assert lm.hidden_parity(h_dense, h_dense)["bitwise_frac"] == 1.0


def test_hidden_validation():
  lm = tiny.tiny_random("llamalike")
  h = lm.hidden(np.zeros((1, 4), np.int32))
  with pytest.raises(ValueError, match=r"expected final hidden states \[\.\.\., 64\]"):
    lm.head(h[..., :3])
  with pytest.raises(ValueError, match="of dtype float32"):
    lm.head(h.astype("bfloat16"))
  with pytest.raises(ValueError, match="expected equal, non-empty shapes"):
    lm.hidden_parity(h, h[:, :2])
  with pytest.raises(ValueError, match="chunk=0"):
    lm.hidden_parity(h, h, chunk=0)
