"""Aggregation over prompts, summary.md, and PNG plots of a parity run."""

from __future__ import annotations

import datetime
import math
import pathlib
from typing import Any, Sequence

import numpy as np

COLUMNS = (
    # (header, summary key, format)
    ("anchor", "anchor", "{}"),
    ("window", "window", "{}"),
    ("top_k", "top_k", "{}"),
    ("budget", "budget", "{}"),
    ("prompts", "prompts", "{}"),
    ("bitwise", "bitwise_frac", "{:.3f}"),
    ("max abs dlogit", "max_abs_logit_diff", "{:.3g}"),
    ("max ulp", "max_ulp_diff", "{}"),
    ("mean KL", "mean_kl", "{:.2e}"),
    ("top-1 agree", "top1_agreement", "{:.4f}"),
    ("greedy exact", "greedy", "{}"),
    ("greedy prefix", "greedy_prefix_frac", "{:.3f}"),
    ("first div (min)", "first_divergence_min", "{}"),
    ("div margin (min)", "divergence_margin_min", "{:.3g}"),
    ("captured min", "captured_mass_min", "{:.6f}"),
    ("captured mean", "captured_mass_mean", "{:.6f}"),
    ("max cert eps", "certified_eps_max", "{:.2e}"),
    ("keys read/visible", "keys_read_frac", "{:.3f}"),
    ("s", "seconds", "{:.1f}"),
)


def _num(value) -> float:
  """Row values as floats ("nan"/"inf" strings back to floats)."""
  return float(value)


def _worst(values, pick):
  """max/min that propagates NaN (Python's max/min drop a NaN unless it comes first)."""
  values = [_num(v) for v in values]
  return math.nan if any(math.isnan(v) for v in values) else pick(values)


def aggregate(rows: Sequence[dict[str, Any]], points) -> list[dict[str, Any]]:
  """One entry per grid point, aggregated over its prompts (worst case for maxima and
  minima, mean for fractions and KL)."""
  out = []
  for point in points:
    mine = [r for r in rows if r["point_key"] == point.key]
    if not mine:
      continue
    first_div = [r["greedy_first_divergence"] for r in mine
                 if r["greedy_first_divergence"] is not None]
    n_exact = sum(bool(r["greedy_exact"]) for r in mine)
    margins = [r["greedy_divergence_margin"] for r in mine
               if r.get("greedy_divergence_margin") is not None]
    out.append({
        "key": point.key, "anchor": point.anchor, "window": point.window,
        "top_k": point.top_k, "budget": point.budget, "covering": point.covering,
        "covers_all_prompts": all(r["covers"] for r in mine),
        "prompts": len(mine),
        "bitwise_frac": float(np.mean([_num(r["bitwise_frac"]) for r in mine])),
        "max_abs_logit_diff": _worst([r["max_abs_logit_diff"] for r in mine], max),
        "max_ulp_diff": max(int(r["max_ulp_diff"]) for r in mine),
        "mean_kl": float(np.mean([_num(r["mean_kl"]) for r in mine])),
        "top1_agreement": float(np.mean([_num(r["top1_agreement"]) for r in mine])),
        "greedy": f"{n_exact}/{len(mine)}",
        "greedy_exact_frac": n_exact / len(mine),
        "greedy_prefix_frac": float(np.mean([r["greedy_prefix"] / r["greedy_n"]
                                             for r in mine])),
        "first_divergence_min": min(first_div) if first_div else "-",
        "divergence_margin_min": min(margins) if margins else "-",
        "captured_mass_min": _worst([r["captured_mass_min"] for r in mine], min),
        "captured_mass_mean": float(np.mean([_num(r["captured_mass_mean"]) for r in mine])),
        "dropped_mass_max": _worst([r["dropped_mass_max"] for r in mine], max),
        "dropped_mass_mean": float(np.mean([_num(r["dropped_mass_mean"]) for r in mine])),
        "certified_eps_max": _worst([r["certified_eps_max"] for r in mine], max),
        "keys_read_frac": float(np.mean([_num(r["keys_read_frac"]) for r in mine])),
        "seconds": sum(_num(r["seconds"]) for r in mine),
    })
  return out


def markdown_table(summary: Sequence[dict[str, Any]]) -> str:
  lines = ["| " + " | ".join(h for h, _, _ in COLUMNS) + " |",
           "|" + "|".join("---" for _ in COLUMNS) + "|"]
  for entry in summary:
    cells = []
    for _, key, fmt in COLUMNS:
      value = entry[key]
      cells.append(fmt.format(value) if not isinstance(value, str) else value)
    if entry["covering"]:
      cells[0] += " (covers all)"
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_summary(workdir: pathlib.Path, config, summary, table: str,
                  dense_rows: Sequence[dict[str, Any]]) -> pathlib.Path:
  lengths = ", ".join(str(x) for x in config.prompts.lengths)
  dense_s = sum(float(r["seconds"]) for r in dense_rows)
  consistent = sum(bool(r["generate_matches_teacher_forced_argmax"]) for r in dense_rows)
  now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  text = [
      f"# {config.name}: condensate vs dense parity",
      "",
      f"model `{config.model.path or config.model.name}` ({config.model.dtype}), "
      f"implementation `{config.attention.implementation}`, dense layers "
      f"{tuple(config.attention.dense_layers) or 'none'}; {len(dense_rows)} prompts "
      f"(lengths {lengths} tokens) x {config.generate.new_tokens} greedy tokens; "
      f"written {now}.",
      "",
      f"Dense reference: {dense_s:.1f} s over all prompts; its greedy tokens equal the "
      f"teacher-forced argmax on {consistent}/{len(dense_rows)} prompts.",
      "",
      table,
      "",
      "Columns (per grid point, over prompts): bitwise = mean fraction of positions whose "
      "logits are bit-identical; max abs dlogit / max ulp = worst logit difference; mean "
      "KL(dense||condensate) per position; top-1 agree = teacher-forced argmax agreement "
      "over prompt + continuation; greedy exact = prompts whose N greedy tokens are all "
      "identical; greedy prefix = mean identical prefix / N; first div = earliest "
      "divergence step; div margin = smallest dense top-1 minus top-2 logit at a first "
      "divergence (near 0: a near-tie flipped); captured = true softmax mass of the set (worst / mean over "
      "layers, heads, queries); max cert eps = worst certified dropped-mass bound; keys "
      "read/visible = set size / visible keys; s = seconds (generate + logits).",
      "",
  ]
  path = workdir / "summary.md"
  path.write_text("\n".join(text))
  return path


def _heatmap(ax, summary, anchor, value_key, title, transform, cmap, vmin=None, vmax=None):
  entries = [e for e in summary if e["anchor"] == anchor and not e["covering"]]
  windows = sorted({e["window"] for e in entries})
  top_ks = sorted({e["top_k"] for e in entries})
  grid = np.full((len(windows), len(top_ks)), np.nan)
  for e in entries:
    grid[windows.index(e["window"]), top_ks.index(e["top_k"])] = transform(e[value_key])
  image = ax.imshow(grid, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
  ax.set_xticks(range(len(top_ks)), [str(k) for k in top_ks])
  ax.set_yticks(range(len(windows)), [str(w) for w in windows])
  ax.set_xlabel("top_k")
  ax.set_ylabel("window")
  ax.set_title(f"{title}, anchor={anchor}", fontsize=9)
  for i in range(len(windows)):
    for j in range(len(top_ks)):
      if not math.isnan(grid[i, j]):
        r, g, b, _ = image.cmap(image.norm(grid[i, j]))
        dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
        ax.text(j, i, f"{grid[i, j]:.2g}", ha="center", va="center", fontsize=7,
                color="white" if dark else "black")
  return image


def plot_all(workdir: pathlib.Path, summary) -> list[pathlib.Path]:
  """heatmap_greedy.png, heatmap_logit_diff.png, captured_mass.png."""
  # Figures through the object API: no pyplot state and no global backend switch, so a
  # notebook that calls this keeps its own inline backend for later plots.
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  anchors = sorted({e["anchor"] for e in summary if not e["covering"]})
  paths = []
  if anchors:
    specs = [("heatmap_greedy.png", "greedy_prefix_frac",
              "greedy identical-prefix fraction", lambda v: v, "viridis", 0.0, 1.0),
             ("heatmap_logit_diff.png", "max_abs_logit_diff", "log10 max |dlogit|",
              lambda v: math.log10(v) if v > 0 else -8.0, "magma_r", None, None)]
    for name, key, title, transform, cmap, vmin, vmax in specs:
      fig = Figure(figsize=(4.5 * len(anchors), 3.8))
      axes = fig.subplots(1, len(anchors), squeeze=False)
      for ax, anchor in zip(axes[0], anchors):
        image = _heatmap(ax, summary, anchor, key, title, transform, cmap, vmin, vmax)
        fig.colorbar(image, ax=ax)
      fig.tight_layout()
      fig.savefig(workdir / name, dpi=110)
      paths.append(workdir / name)

  fig = Figure(figsize=(10, 3.8))
  ax0, ax1 = fig.subplots(1, 2)
  budgets = [e["budget"] for e in summary]
  ax0.scatter(budgets, [e["dropped_mass_max"] for e in summary], label="worst query")
  ax0.scatter(budgets, [e["dropped_mass_mean"] for e in summary], marker="x",
              label="mean")
  ax1.scatter(budgets, [e["certified_eps_max"] for e in summary], color="C3")
  for ax, label in ((ax0, "dropped mass = 1 - captured mass"),
                    (ax1, "max certified eps")):
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1e-9)
    ax.set_ylim(0.0, 1.5)  # masses are in [0, 1]; 0 = nothing dropped
    ticks = sorted(set(budgets))
    ax.set_xticks(ticks, [str(b) for b in ticks], rotation=45, fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel("budget = anchor + window + top_k")
    ax.set_ylabel(label)
    ax.axhline(2.0**-24, color="gray", lw=0.8, ls="--")
  ax0.legend(fontsize=8)
  ax0.set_title("captured mass vs budget (dashed: 2^-24)", fontsize=9)
  ax1.set_title("certificate vs budget", fontsize=9)
  fig.tight_layout()
  fig.savefig(workdir / "captured_mass.png", dpi=110)
  paths.append(workdir / "captured_mass.png")
  return paths
