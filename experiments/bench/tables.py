"""The markdown tables of the benchmark jobs: `fast_table` (fast_bench rows) and
`kernel_table` (kernel_bench rows), both through `markdown`."""

from __future__ import annotations

import json
import pathlib
from typing import Sequence


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """A markdown table: header cells, a `---` rule, one line per row of cells."""
  lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
  lines += ["| " + " | ".join(cells) + " |" for cells in rows]
  return "\n".join(lines)


def fmt_time(x):
  """Seconds as ms (>= 1 ms) or µs; None as a dash."""
  if x is None:
    return "—"
  return f"{x * 1e3:.3f} ms" if x >= 1e-3 else f"{x * 1e6:.1f} µs"


def fmt_num(x, digits=3):
  return "—" if x is None else f"{x:.{digits}g}"


def variant(r):
  """Row label beyond P/M: "lean" (rank selection + fused kernels, decode_step's default)
  or "split" (XLA top-M + split-K kernel + XLA merge: the first run's step; rows of runs
  before the kernel field existed), another method, centre ranking, unrolled loop."""
  if r["op"] != "decode":
    return ""
  method, kern = r.get("select_method"), r.get("kernel", "split")
  parts = ["lean" if (method, kern) == ("rank", "fused") else
           "split" if (method, kern) == ("superblock", "split") else f"{method} {kern}"]
  parts += ["centre"] if r.get("rank") == "centre" else []
  parts += ["unrolled"] if r.get("unroll") else []
  return "".join(" " + p for p in parts)


_FAST_HEADER = ("op", "inputs", "B", "keys", "P/M", "condensate (select + attend alone)",
                "floor", "cuDNN", "XLA", "dense floor", "speedup vs best dense",
                "captured mean/min", "eps bound max", "max abs err", "kernel err")


def _fast_cells(r):
  dense = [x for x in (r.get("cudnn_s"), r.get("xla_s")) if x]
  speed = (f"{min(dense) / r['condensate_s']:.1f}×" if dense and r.get("condensate_s")
           else "—")
  err = r.get("max_abs_err", r.get("max_abs_err_vs_cudnn", float("nan")))
  return [r["op"], r["inputs"], str(r["batch"]), f"{r['kv_len'] // 1024}K",
          f"{r['block_size']}/{r['top_blocks']}{variant(r)}",
          f"{fmt_time(r.get('condensate_s'))} ({fmt_time(r.get('select_s'))} + "
          f"{fmt_time(r.get('attend_s'))})",
          fmt_time(r["condensate_floor_s"]), fmt_time(r.get("cudnn_s")),
          fmt_time(r.get("xla_s")), fmt_time(r["dense_floor_s"]), speed,
          f"{r['captured_mean']:.4f}/{r['captured_min']:.4f}",
          f"{r['eps_bound_max']:.2e}", f"{err:.3g}",
          "—" if r.get("kernel_err") is None else format(r["kernel_err"], ".2g")]


def fast_table(rows, device, ceilings):
  """fast_bench's table: the device line, then one row per case."""
  bw, mm = ceilings
  return (f"device: {device}; measured read+write bandwidth {bw / 1e12:.2f} TB/s, bf16 "
          f"matmul {mm / 1e12:.0f} TFLOP/s\n\n"
          + markdown(_FAST_HEADER, [_fast_cells(r) for r in rows]))


def fast_table_of(results_jsonl) -> str:
  """`fast_table` of a (possibly interrupted) run's results.jsonl."""
  text = pathlib.Path(results_jsonl).read_text()
  rows = [json.loads(line) for line in text.splitlines() if line.strip()]
  return fast_table(rows, rows[0]["device"], (rows[0]["bandwidth"], rows[0]["matmul_rate"]))


_KERNEL_HEADER = ("case", "B", "T", "S", "dense XLA ms", "cuDNN ms", "best dense thru",
                  "cond. XLA ms", "cond. Pallas ms", "= selection ms", "(scores ms)",
                  "+ kernel ms", "kernel GB/s", "kernel / best dense", "Pallas / best dense")


def _kernel_cells(r):
  thru = (f"{fmt_num(r['best_dense_GBps'])} GB/s" if "best_dense_GBps" in r else
          f"{fmt_num(r['best_dense_TFLOPs'])} TFLOP/s" if "best_dense_TFLOPs" in r else "—")
  ms = lambda name: fmt_num(r.get(name))
  return [r["case"], str(r["B"]), str(r["T"]), str(r["S"]), ms("dense_xla_ms"),
          ms("cudnn_ms"), thru, ms("condensate_xla_ms"), ms("condensate_pallas_ms"),
          ms("selection_only_ms"), ms("scores_only_ms"), ms("gather_kernel_only_ms"),
          ms("gather_kernel_GBps"), ms("gather_kernel_only_over_best_dense") + "×",
          ms("condensate_pallas_over_best_dense") + "×"]


def kernel_table(rows):
  """kernel_bench's table: one row per case."""
  return markdown(_KERNEL_HEADER, [_kernel_cells(r) for r in rows])


def names_arg(flag: str, text: str, allowed) -> list:
  """The comma-separated names of a bench's flag, each one of `allowed` (ValueError
  naming the flag otherwise)."""
  names = [x for x in text.split(",") if x]
  for x in names:
    if x not in allowed:
      raise ValueError(f"{flag}: {x!r} is not one of {list(allowed)}.")
  return names


def check_loops(iterations: int, repeats: int) -> None:
  """ValueError unless a timed bench's --iterations and --repeats are >= 1."""
  if iterations < 1 or repeats < 1:
    raise ValueError(f"--iterations={iterations}, --repeats={repeats}: expected >= 1.")
