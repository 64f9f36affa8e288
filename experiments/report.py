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
    ("dlogit/ulp(max)", "max_diff_scale_ulps", "{:.3g}"),
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
# Inserted after top_k when the grid holds block-selection points (DESIGN.md §4):
# P = block_size, M = top_blocks ("blocks"), eps = target ("certified"); "-" where the
# mode does not use the setting.
SELECTION_COLUMNS = (
    ("selection", "selection_cell", "{}"),
    ("P", "block_size_cell", "{}"),
    ("M", "top_blocks_cell", "{}"),
    ("eps", "epsilon_cell", "{:g}"),
)
# Inserted before "s" for such grids: keys attended per query (mean over everything; mean
# at the last position) and keys whose score the selection computed / visible.
SET_SIZE_COLUMNS = (
    ("set size mean", "set_size_mean", "{:.0f}"),
    ("set size last", "set_size_last_mean", "{:.0f}"),
    ("keys scored/visible", "keys_scored_frac", "{:.3f}"),
)


# Sampled runs (generate.temperature > 0): the token columns compare sampled tokens
# (same noise on both sides), and the sampling distributions' distance is added.
SAMPLED_COLUMNS = (
    ("sample TV mean", "sample_tv_mean", "{:.2e}"),
    ("sample TV max", "sample_tv_max", "{:.2e}"),
)


def columns(summary: Sequence[dict[str, Any]]) -> tuple:
  """COLUMNS, plus the selection and set-size columns when any point is not exact, and
  the sampling columns (token headers renamed) when the run sampled."""
  cols = COLUMNS
  if any(e.get("decoding") == "sampled" for e in summary):
    at = [h for h, _, _ in cols].index("greedy prefix") + 1
    cols = tuple((h.replace("greedy", "sampled"), k, f) for h, k, f in cols[:at]) + (
        SAMPLED_COLUMNS + cols[at:])
  if all(e.get("selection", "exact") == "exact" for e in summary):
    return cols
  at, end = [h for h, _, _ in cols].index("top_k") + 1, len(cols) - 1
  return (cols[:at] + SELECTION_COLUMNS + cols[at:end] + SET_SIZE_COLUMNS + cols[end:])


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
        "max_diff_scale_ulps": (_worst([r["max_diff_scale_ulps"] for r in mine], max)
                                if all("max_diff_scale_ulps" in r for r in mine)
                                else "-"),   # rows written before it existed
        "decoding": mine[0].get("decoding", "greedy"),
        "sample_tv_mean": _mean_or_dash(mine, "sample_tv_mean"),
        "sample_tv_max": (_worst([r["sample_tv_max"] for r in mine], max)
                          if all("sample_tv_max" in r for r in mine) else "-"),
        "sample_kl_mean": _mean_or_dash(mine, "sample_kl_mean"),
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
        **_selection_fields(point, mine),
    })
  return out


def _mean_or_dash(rows, key):
  values = [_num(r[key]) for r in rows if r.get(key) is not None]
  return float(np.mean(values)) if len(values) == len(rows) else "-"


def _selection_fields(point, rows) -> dict[str, Any]:
  """The point's selection settings (cells "-" where its mode does not use them) and
  the set-size summaries (rows written before they existed give "-")."""
  selection = "exact" if point.covering else getattr(point, "selection", "exact")
  index_bounds = selection == "certified" and getattr(point, "bounds", None) != "blocks"
  block = selection in ("bounded", "blocks", "certified") and not index_bounds
  label = selection + (" (index)" if index_bounds else "")
  if selection == "blocks" and rows:   # options recorded in the rows (absent: defaults)
    label += "".join(f" {x}" for x in (
        "centre" if rows[0].get("block_rank", "bound") == "centre" else "",
        "query-blocks" if rows[0].get("query_blocks") else "") if x)
  return {
      "selection": selection,
      "selection_cell": label,
      "block_size": getattr(point, "block_size", None) if block else None,
      "top_blocks": point.top_blocks if selection == "blocks" else None,
      "epsilon": point.epsilon if selection == "certified" else None,
      "block_size_cell": point.block_size if block else "-",
      "top_blocks_cell": point.top_blocks if selection == "blocks" else "-",
      "epsilon_cell": point.epsilon if selection == "certified" else "-",
      "set_size_mean": _mean_or_dash(rows, "set_size_mean"),
      "set_size_max": (max(_num(r["set_size_max"]) for r in rows)
                       if all(r.get("set_size_max") is not None for r in rows) else "-"),
      "set_size_last_mean": _mean_or_dash(rows, "set_size_last_mean"),
      "keys_scored_frac": _mean_or_dash(rows, "keys_scored_frac"),
  }


def markdown_table(summary: Sequence[dict[str, Any]]) -> str:
  cols = columns(summary)
  lines = ["| " + " | ".join(h for h, _, _ in cols) + " |",
           "|" + "|".join("---" for _ in cols) + "|"]
  for entry in summary:
    cells = []
    for _, key, fmt in cols:
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
  g = config.generate
  sampled = float(g.get("temperature", 0.0)) > 0
  tokens = (f"sampled tokens (temperature {g.temperature:g}, top-p {g.top_p:g}, seed "
            f"{g.seed}; dense and condensate draw with the same noise)" if sampled
            else "greedy tokens")
  check = ("are all inside the teacher-forced top-p nucleus" if sampled
           else "equal the teacher-forced argmax")
  text = [
      f"# {config.name}: condensate vs dense parity",
      "",
      f"model `{config.model.path or config.model.name}` ({config.model.dtype}), "
      f"implementation `{config.attention.implementation}`, dense layers "
      f"{tuple(config.attention.dense_layers) or 'none'}; {len(dense_rows)} "
      f"prompt{'' if len(dense_rows) == 1 else 's'} "
      f"(lengths {lengths} tokens) x {config.generate.new_tokens} {tokens}; "
      f"written {now}.",
      "",
      f"Dense reference: {dense_s:.1f} s over all prompts; its decoded tokens {check} "
      f"on {consistent}/{len(dense_rows)} prompts.",
      "",
      table,
      "",
      "Columns (per grid point, over prompts): bitwise = mean fraction of positions whose "
      "logits are bit-identical; max abs dlogit = worst logit difference; dlogit/ulp(max) "
      "= the same in units of float32 spacing at the largest |dense logit| (0 bitwise, a "
      "few: another summation order, large: the output moved); mean "
      "KL(dense||condensate) per position; top-1 agree = teacher-forced argmax agreement "
      "over prompt + continuation; greedy exact = prompts whose N greedy tokens are all "
      "identical; greedy prefix = mean identical prefix / N; first div = earliest "
      "divergence step; div margin = smallest dense top-1 minus top-2 logit at a first "
      "divergence (near 0: a near-tie flipped); captured = true softmax mass of the set (worst / mean over "
      "layers, heads, queries); max cert eps = worst certified dropped-mass bound; keys "
      "read/visible = set size / visible keys; s = seconds (generate + logits).",
      "",
  ]
  if sampled:
    text[-1:-1] = [
        "",
        "Sampled decoding: the token columns compare the sampled tokens (the same seed, "
        "so both sides draw with the same Gumbel noise and differ only where their "
        "distributions do); sample TV = total variation between the dense and condensate "
        "sampling distributions (temperature and top-p applied) at the N drawn "
        "positions, teacher forced along the dense tokens: any sampler pair disagrees at "
        "a step with probability at least its TV. Rows also hold sample_kl_mean."]
  if any(e.get("selection", "exact") != "exact" for e in summary):
    text[-1:-1] = [
        "",
        "Block selection (DESIGN.md §4): selection = how the top part of the set is "
        "found; P = keys per block; M = blocks read besides anchor and window "
        "(\"blocks\", whose top_k is shown as M*P so its budget compares with the exact "
        "point of the same top_k); eps = certified dropped-mass target (\"certified\": "
        "top_k 0, the set grows per query until the certificate is <= eps); set size "
        "mean / last = keys attended per query, mean over everything / at the last "
        "position; keys scored/visible = keys whose exact score the selection computed. "
        "Only exact-selection points are exactness-gate points."]
  path = workdir / "summary.md"
  path.write_text("\n".join(text))
  return path


def _variant(entry) -> tuple:
  return tuple(entry.get(k, "-") for k in ("selection", "block_size_cell",
                                            "top_blocks_cell", "epsilon_cell"))


def heatmap_entries(summary) -> list[dict[str, Any]]:
  """The non-covering entries the window x top_k heatmaps show: all of them when they
  share one selection setting; in a block grid only the exact-selection ones (block
  points are in selection.png)."""
  entries = [e for e in summary if not e["covering"]]
  if len({_variant(e) for e in entries}) <= 1:
    return entries
  return [e for e in entries if e.get("selection", "exact") == "exact"]


def _heatmap(ax, summary, anchor, value_key, title, transform, cmap, vmin=None, vmax=None):
  entries = [e for e in heatmap_entries(summary) if e["anchor"] == anchor]
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

  anchors = sorted({e["anchor"] for e in heatmap_entries(summary)})
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

  # "certified" points have no fixed budget (their set size is in selection.png).
  fixed = [e for e in summary if e.get("selection", "exact") != "certified"]
  fig = Figure(figsize=(10, 3.8))
  ax0, ax1 = fig.subplots(1, 2)
  budgets = [e["budget"] for e in fixed]
  ax0.scatter(budgets, [e["dropped_mass_max"] for e in fixed], label="worst query")
  ax0.scatter(budgets, [e["dropped_mass_mean"] for e in fixed], marker="x",
              label="mean")
  ax1.scatter(budgets, [e["certified_eps_max"] for e in fixed], color="C3")
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
  if any(e.get("selection", "exact") != "exact" for e in summary):
    paths.append(plot_selection(workdir, summary))
  return paths


_MARKERS = {"exact": "o", "bounded": "s", "blocks": "^", "certified": "D", "indexed": "v"}


def _short_label(entry) -> str:
  """k1024 / P64M16 / P64 e0.001 / k64 P16 (+ a/w when the grid has several)."""
  selection = entry.get("selection", "exact")
  label = {"exact": f"k{entry['top_k']}",
           "blocks": f"P{entry.get('block_size_cell')}M{entry.get('top_blocks_cell')}",
           "certified": f"P{entry.get('block_size_cell')} e{entry.get('epsilon_cell')}",
           "bounded": f"k{entry['top_k']} P{entry.get('block_size_cell')}",
           "indexed": f"k{entry['top_k']} idx"}[selection]
  return f"a{entry['anchor']}w{entry['window']} {label}"


def plot_selection(workdir: pathlib.Path, summary) -> pathlib.Path:
  """selection.png: every non-covering point against the fraction of keys it read —
  greedy identical-prefix fraction (left) and worst true dropped mass / certified eps
  (right) — one marker per selection mode, each point labelled with its key."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  entries = [e for e in summary if not e["covering"]]
  fig = Figure(figsize=(11, 4.2))
  ax0, ax1 = fig.subplots(1, 2)
  for selection, marker in _MARKERS.items():
    mine = [e for e in entries if e.get("selection", "exact") == selection]
    if not mine:
      continue
    x = [e["keys_read_frac"] for e in mine]
    ax0.scatter(x, [e["greedy_prefix_frac"] for e in mine], marker=marker,
                label=selection)
    ax1.scatter(x, [e["dropped_mass_max"] for e in mine], marker=marker,
                label=f"{selection}: true dropped (worst)")
    ax1.scatter(x, [e["certified_eps_max"] for e in mine], marker=marker,
                facecolors="none", edgecolors="C3", label=f"{selection}: certified eps")
    for e in mine:
      ax0.annotate(_short_label(e), (e["keys_read_frac"], e["greedy_prefix_frac"]),
                   fontsize=6, rotation=30)
  ax0.set_ylim(-0.05, 1.05)
  ax0.set_ylabel("greedy identical-prefix fraction")
  ax1.set_yscale("symlog", linthresh=1e-9)
  ax1.set_ylim(0.0, 1.5)
  ax1.axhline(2.0**-24, color="gray", lw=0.8, ls="--")
  ax1.set_ylabel("dropped mass")
  for ax in (ax0, ax1):
    ax.set_xlabel("keys read / keys visible")
    ax.legend(fontsize=7)
  ax0.set_title("greedy parity vs keys read", fontsize=9)
  ax1.set_title("dropped mass vs keys read (dashed: 2^-24)", fontsize=9)
  fig.tight_layout()
  fig.savefig(workdir / "selection.png", dpi=110)
  return workdir / "selection.png"
