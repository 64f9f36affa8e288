"""The one config schema shared by every parity config (and the keys other jobs reuse).

Keys users override most (`--config.KEY=VALUE`; tuples as `--config.attention.top_k="(8,32)"`):

  model.name            registry name or HF hub id ("smollm2-135m", "tiny-random", "gpt2")
  model.path            local dir or .gguf file; when set, used instead of model.name
  model.dtype           "float32" (default), "bfloat16" or "float16"
  attention.top_k       tuple of top-k values to sweep
  attention.window      tuple of local-window sizes
  attention.anchor      tuple of anchor sizes
  attention.dense_layers  layers kept dense in every condensate point ("pillars"), a tuple
  attention.implementation  "xla" (default), "xla_gathered", "pallas", ...
  attention.mesh        "" (one device) or "seq=4,heads=2": every model call (dense
                        reference included) through cj.distributed over that mesh of the
                        first devices (selection "exact", "indexed" or "blocks"; the gate then
                        allows rounding)
  attention.block_rank  "bound" (default) or "centre": how "blocks" points rank blocks
  attention.query_blocks  True: "blocks" points select per block of prompt rows (the
                        timed prefill's lists); False (default): per query
  attention.selection   "exact" (default), "bounded", "blocks", "certified" (+ epsilon,
                        bounds: "index" (+ index_bits) or "blocks" (+ block_size)),
                        "indexed" (+ index_bits, candidates), block modes (+ block_size,
                        top_blocks); any of
                        selection / block_size / top_blocks / epsilon may be a tuple, and
                        they are then grid axes (experiments.grid.selection_variants)
  prompts.num           number of distinct prompts (built-in texts or texts from files)
  prompts.lengths       tuple of prompt lengths in tokens (each + new_tokens <= context)
  prompts.files         comma-separated .txt / .jsonl paths ("" = built-in texts)
  generate.new_tokens   greedy tokens per prompt (default 128)
  generate.temperature  0.0 (default): greedy; > 0: sampled decoding (with top_p, seed),
                        dense and condensate drawing with the same noise; rows then
                        hold the sampling distributions' TV / KL too
  job                   "parity" (this schema) or another job of experiments.cli.JOBS
  resume                "match" (default: a rerun resumes only the same config) or
                        "extend" (add this config's rows to another config's workdir)
"""

from __future__ import annotations

from typing import Optional, Sequence

import ml_collections


def parse_arg(arg: Optional[str], allowed: dict[str, Sequence[str]]) -> dict[str, str]:
  """Parses a config-file argument "key=value,key=value" (the part after `name.py:`).

  `allowed` maps each key to its allowed values; anything else raises ValueError.
  """
  out: dict[str, str] = {}
  if not arg:
    return out
  for item in arg.split(","):
    key, sep, value = item.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or key not in allowed:
      raise ValueError(
          f"config argument {item!r}: expected key=value with key in {sorted(allowed)}.")
    if allowed[key] and value not in allowed[key]:
      raise ValueError(
          f"config argument {key}={value!r}: expected one of {list(allowed[key])}.")
    out[key] = value
  return out


def _scalar_or_tuple(value):
  return tuple(value) if isinstance(value, (tuple, list)) else value


def parity_config(*, name: str, model: str, top_k: Sequence[int], window: Sequence[int],
                  anchor: Sequence[int] = (1,), lengths: Sequence[int] = (512,),
                  num_prompts: int = 4, new_tokens: int = 128,
                  dtype: str = "float32", selection="exact", block_size=64,
                  top_blocks=8, epsilon=2.0**-24, block_rank="bound",
                  query_blocks=False) -> ml_collections.ConfigDict:
  """A parity sweep: top_k x window x anchor, plus the dense reference and a
  covers-everything point (added by the runner), over prompts x lengths.

  selection, block_size, top_blocks, epsilon: scalars (every non-gate point uses them)
  or tuples (block-selection grid axes; see experiments.grid.selection_variants).
  """
  config = ml_collections.ConfigDict()
  config.name = name
  config.job = "parity"
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.name = model
  config.model.path = ""
  config.model.dtype = dtype

  config.attention = ml_collections.ConfigDict()
  config.attention.top_k = tuple(top_k)
  config.attention.window = tuple(window)
  config.attention.anchor = tuple(anchor)
  config.attention.dense_layers = ()
  config.attention.implementation = "xla"
  config.attention.mesh = ""
  # Block-summary selection (DESIGN.md §4): "exact" (default), "bounded", "blocks",
  # "certified"; the covers-everything gate point always uses "exact".
  config.attention.selection = _scalar_or_tuple(selection)
  config.attention.block_size = _scalar_or_tuple(block_size)
  config.attention.top_blocks = _scalar_or_tuple(top_blocks)
  config.attention.epsilon = _scalar_or_tuple(epsilon)
  # "blocks" points only: rank blocks by "bound" (as specified) or "centre"; query_blocks
  # = True selects per block of prompt rows with the timed prefill's lists
  # (CondensateSpec.block_rank / query_blocks)
  config.attention.block_rank = block_rank
  config.attention.query_blocks = query_blocks
  # "indexed" points (CondensateSpec.index_bits / candidates; 0 = 4 * top_k)
  config.attention.index_bits = 4
  config.attention.candidates = 0
  # "certified" points: bound the unscored keys with the key index ("index", default:
  # index_bits) or with block summaries ("blocks": block_size); CondensateSpec.bounds
  config.attention.bounds = "index"

  config.prompts = ml_collections.ConfigDict()
  config.prompts.num = num_prompts
  config.prompts.lengths = tuple(lengths)
  config.prompts.files = ""
  config.prompts.jsonl_field = "text"

  config.generate = ml_collections.ConfigDict()
  config.generate.new_tokens = new_tokens
  config.generate.temperature = 0.0
  config.generate.top_p = 1.0
  config.generate.seed = 0

  # The covers-everything point must equal dense bit for bit; False only to inspect a
  # failing implementation (the run then still reports the failure in summary.md).
  config.gate = True
  config.plots = True
  # Rerunning a workdir resumes it when the config is the same ("match"); "extend" adds
  # this config's rows to a workdir that holds another config's rows.
  config.resume = "match"
  return config


def hub_parity_config(arg: Optional[str], *, name: str, model: str,
                      full_lengths: Sequence[int], dtype: str = "float32"
                      ) -> ml_collections.ConfigDict:
  """The grid every hub-model parity config shares; `:size=small|full` picks one.

  full: top_k (8, 32, 128) x window (16, 64, 256) x anchor (1, 4); 4 prompts at
  `full_lengths`; 128 greedy tokens. small: top_k (8, 32) x window (16, 64), anchor 1;
  2 prompts of 256 tokens; 32 greedy tokens.
  """
  sizes = {
      "full": dict(top_k=(8, 32, 128), window=(16, 64, 256), anchor=(1, 4),
                   lengths=tuple(full_lengths), num_prompts=4, new_tokens=128),
      "small": dict(top_k=(8, 32), window=(16, 64), anchor=(1,), lengths=(256,),
                    num_prompts=2, new_tokens=32),
  }
  args = parse_arg(arg, {"size": tuple(sizes)})
  return parity_config(name=name, model=model, dtype=dtype,
                       **sizes[args.get("size", "full")])


def sweep_of(config: ml_collections.ConfigDict) -> list[dict[str, int]]:
  """The grid a config sweeps, as a list of {anchor, window, top_k} (the runner adds
  the covers-everything point and the dense reference); for a block-selection grid
  each entry also holds selection, block_size, top_blocks and epsilon."""
  a = config.attention
  if any(isinstance(a[k], tuple) for k in ("selection", "block_size", "top_blocks",
                                             "epsilon")):
    from experiments import grid  # pylint: disable=import-outside-toplevel
    return [dict(anchor=x, window=w, **v) for x in a.anchor for w in a.window
            for v in grid.selection_variants(config)]
  return [dict(anchor=x, window=w, top_k=k) for x in a.anchor for w in a.window
          for k in a.top_k]


def training_data(smoke: bool, *, seq_len: int, batch: int, accumulate: int = 1) -> dict:
  """config.data of the training jobs (distill, pretrain): the offline corpus
  (condensate_jax.train.corpus; 60K characters in smoke runs, all of it otherwise), 10%
  of its documents held out, windows of seq_len tokens, batch x accumulate per step."""
  return dict(sources=("pydoc_topics", "stdlib_docstrings"),
              max_chars=60_000 if smoke else 0, holdout=0.1, seq_len=seq_len, batch=batch,
              accumulate=accumulate)


def adamw(*, learning_rate: float, steps: int, warmup_steps: int,
          weight_decay: float) -> dict:
  """config.optim of the training jobs (condensate_jax.train.OptimConfig's fields)."""
  return dict(learning_rate=learning_rate, steps=steps, warmup_steps=warmup_steps,
              min_lr_ratio=0.1, weight_decay=weight_decay, clip_norm=1.0, b1=0.9, b2=0.95,
              eps=1e-8)

