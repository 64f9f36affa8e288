"""Checkpoints: exact round trips (bfloat16 and 0-d leaves too), pruning, refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from condensate_jax.train import checkpoint


def _tree(seed=0):
  rng = np.random.default_rng(seed)
  params = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(4,)), jnp.bfloat16)}
  opt = optax.adamw(1e-3).init(params)
  return params, opt, jnp.asarray(7, jnp.int32)


def test_round_trip_is_bitwise_with_dtypes_and_scalars(tmp_path):
  tree = _tree()
  checkpoint.save(tmp_path, 3, tree, metadata={"spec": "x"})
  back, meta = checkpoint.restore(checkpoint.latest(tmp_path)[1], _tree(1))
  assert meta == {"step": 3, "spec": "x"}
  for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(back)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a).reshape(-1).view(np.uint8),
                                  np.asarray(b).reshape(-1).view(np.uint8))
  assert jax.tree.structure(back) == jax.tree.structure(tree)


def test_keeps_the_newest_and_leaves_no_temporary_file(tmp_path):
  for step in (1, 2, 3, 4):
    checkpoint.save(tmp_path, step, _tree(), keep=2)
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "ckpt-00000003.safetensors", "ckpt-00000004.safetensors"]
  assert checkpoint.latest(tmp_path)[0] == 4
  assert checkpoint.latest(tmp_path / "none") is None


def test_refuses_a_checkpoint_of_another_state(tmp_path):
  path = checkpoint.save(tmp_path, 1, _tree())
  other = ({"w": jnp.zeros((3, 5))}, )
  with pytest.raises(ValueError, match="does not match the training state"):
    checkpoint.restore(path, other)
  wrong = (_tree()[0] | {"w": jnp.zeros((3, 4), jnp.bfloat16)},) + _tree()[1:]
  with pytest.raises(ValueError, match=r"\['w'\]: stored float32\[3, 4\], expected bfloat16"):
    checkpoint.restore(path, wrong)
  with pytest.raises(ValueError, match="step"):
    checkpoint.save(tmp_path, -1, _tree())
