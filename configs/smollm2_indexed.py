"""python -m experiments.run --config=smollm2_indexed.py:size=gpu,text=code --workdir=runs/smollm2_indexed_code

Issue #13's model target: "indexed" selection against exact top-k of the same middle-key
budget on SmolLM2-135M-Instruct (float32, anchor 16, window 64, 4-bit index), one run,
the same prompts, plus the runner's covers-everything gate and the dense reference.
  size=gpu:  7936-token prompts, top_k 1024, 2048 candidates (about 3 minutes a prompt on
             an H200 once compiled; 6 with compilation), 32 greedy tokens;
  size=cpu:  2048-token prompts, top_k 512, 1024 candidates (about 25 minutes a prompt on
             2 CPU cores), 32 greedy tokens.
certified=true|false adds selection="certified" on the same index (bounds="index") at
eps 1e-3: the set grows per query until its certificate holds (default: true at size=cpu,
false at size=gpu, where its float32 sort of every query's bounds is the slow part).
text=<name> takes a single built-in text (experiments/prompts.py: prose, code, list,
dialogue, record, letter, notes, verse) repeated to the prompt length; text=all (default)
takes the first 4 built-in prompts (prompt i: text i followed by the next texts).
Measured: BENCHMARKS.md "## Indexed selection".
"""

from configs import common
from experiments import prompts

_SIZES = {"gpu": dict(top_k=(1024,), lengths=(7936,), candidates=2048),
          "cpu": dict(top_k=(512,), lengths=(2048,), candidates=1024)}


def get_config(arg=None):
  args = common.parse_arg(arg, {"size": tuple(_SIZES),
                                "text": ("all",) + tuple(prompts.BUILTIN_TEXTS),
                                "certified": ("true", "false")})
  name = args.get("size", "gpu")
  size = _SIZES[name]
  text = args.get("text", "all")
  certified = args.get("certified", "true" if name == "cpu" else "false") == "true"
  config = common.parity_config(
      name="smollm2_indexed", model="smollm2-135m", dtype="float32", window=(64,),
      anchor=(16,), selection=("exact", "indexed") + (("certified",) if certified else ()),
      epsilon=(1e-3,), top_k=size["top_k"], lengths=size["lengths"],
      num_prompts=4 if text == "all" else 1, new_tokens=32)
  config.attention.index_bits = 4
  config.attention.candidates = size["candidates"]
  if text != "all":
    config.prompts.builtin = text
  return config
