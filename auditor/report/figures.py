"""Report figures (PNG, written into the run or compare folder's ``figures/``): head relevance, flag counts, and the
relevance shift between two runs of one architecture."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from auditor.engine.heads import layer_of, parse_head_name
from auditor.errors import AuditorError
from auditor.run_relevance import Relevance

FLAG_COLOURS = {"missing": "#c0392b", "misplaced": "#e67e22", "misinterpreted": "#8e44ad"}


def short_layer(layer: str) -> str:
    """'up_blocks.1.attentions.0.transformer_blocks.0.attn2' -> 'up1.0'; 'mid_block...' -> 'mid'; a transformer
    block past the first (SDXL stacks up to ten) adds '.tN'."""
    parts = layer.split(".")
    nums = [int(p) for p in parts if p.isdigit()]
    if parts[0] == "mid_block":
        label, rest = "mid" + (f".{nums[0]}" if nums and nums[0] else ""), nums[1:]
    elif parts[0] in ("down_blocks", "up_blocks"):
        label, rest = parts[0].split("_")[0] + ".".join(map(str, nums[:2])), nums[2:]
    else:
        return layer
    return label + (f".t{rest[0]}" if rest and rest[0] else "")


def short_head(name: str) -> str:
    """'up_blocks.1.attentions.0.transformer_blocks.0.attn2#h3' -> 'up1.0 h3'."""
    try:
        layer, j = parse_head_name(name)
    except ValueError:
        return short_layer(name)
    return f"{short_layer(layer)} h{j}"


def layer_groups(head_names: list[str]) -> list[tuple[str, int, int]]:
    """(layer, first head, end) runs of consecutive heads of one layer, in matrix order."""
    groups: list[tuple[str, int, int]] = []
    for i, name in enumerate(head_names):
        layer = layer_of(name)
        if groups and groups[-1][0] == layer:
            groups[-1] = (layer, groups[-1][1], i + 1)
        else:
            groups.append((layer, i, i + 1))
    return groups


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _layer_axis(ax, head_names: list[str], line_colour: str, fontsize: float = 8) -> None:
    """Separators between layers and one label per layer under the heads it owns."""
    groups = layer_groups(head_names)
    for _, start, _ in groups[1:]:
        ax.axvline(start, color=line_colour, lw=1.0)
    step = max(1, len(groups) // 40)  # SDXL has ~70 layers: label every n-th so labels stay readable
    ax.set_xticks([(s + e) / 2 for _, s, e in groups[::step]])
    few = len(groups[::step]) <= 12  # a handful of layers: labels read horizontally
    ax.set_xticklabels([short_layer(g) for g, _, _ in groups[::step]], rotation=0 if few else 90, fontsize=fontsize)
    ax.tick_params(axis="x", length=0 if few else 3)
    ax.set_xlabel(f"cross-attention heads, grouped by layer ({len(head_names)} heads, {len(groups)} layers)",
                  fontsize=fontsize)


def _scaled(rel: Relevance) -> np.ndarray:
    # Each row scaled to its own maximum, so every category's best heads stand out whatever its vote count.
    return rel.matrix / np.maximum(rel.matrix.max(axis=1, keepdims=True), 1e-12)


def _heatmap_width(n_heads: int) -> float:
    """Inches: wide enough that a head is a visible column, no wider than a landscape page. The report shows the
    figure at the text width (about 7 in), so fonts are sized for that."""
    return float(min(13.0, max(7.5, 2.5 + 0.09 * n_heads)))


def relevance_heatmap(rel: Relevance, out: Path) -> Path:
    """Categories x heads (rows scaled to their maximum)."""
    import seaborn as sns

    plt = _plt()
    width = _heatmap_width(len(rel.head_names))
    fs = 8 * width / 7.5  # the figure is shrunk to the text width: scale fonts back up
    fig, ax = plt.subplots(figsize=(width, 1.3 + 0.3 * len(rel.categories) * width / 7.5), dpi=130)
    sns.heatmap(_scaled(rel), ax=ax, cmap="rocket_r", yticklabels=rel.categories,
                cbar_kws={"label": "relevance / row max", "shrink": 0.8, "pad": 0.01})
    ax.tick_params(axis="y", labelsize=fs, rotation=0)
    ax.figure.axes[-1].tick_params(labelsize=fs * 0.9)
    ax.figure.axes[-1].yaxis.label.set_size(fs)
    _layer_axis(ax, rel.head_names, "white", fs)
    fig.tight_layout()
    return _save(fig, out)


def flag_bars(summary: dict, out: Path) -> Path | None:
    """Flags per category, stacked by type; None when nothing was flagged."""
    counts = summary.get("flags_by_category") or {}
    if not any(sum(v.values()) for v in counts.values()):
        return None
    plt = _plt()
    cats = sorted(counts, key=lambda c: sum(counts[c].values()))
    fig, ax = plt.subplots(figsize=(5.5, 0.8 + 0.28 * len(cats)), dpi=130)
    left = np.zeros(len(cats))
    for ftype, colour in FLAG_COLOURS.items():
        vals = np.array([counts[c].get(ftype, 0) for c in cats])
        ax.barh(cats, vals, left=left, color=colour, label=ftype)
        left += vals
    ax.set_xlabel("flags (all seeds)")
    ax.legend(frameon=False, fontsize=8, loc="lower right")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return _save(fig, out)


def relevance_shift(a: Relevance, b: Relevance, overlap: dict[str, float], k: int, out: Path) -> Path:
    """Left: top-k overlap per category; right: change of each head's relevance (B - A, rows scaled as above)."""
    import seaborn as sns

    plt = _plt()
    delta = _scaled(b) - _scaled(a)
    width = _heatmap_width(len(a.head_names)) + 1.5
    fs = 8 * width / 9.0
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(width, 1.5 + 0.3 * len(a.categories) * width / 9.0), dpi=130,
                                   gridspec_kw={"width_ratios": [1, 5]})
    cats = a.categories
    ax0.barh(cats, [overlap[c] for c in cats], color="#2c7fb8")
    ax0.set_xlim(0, 1)
    ax0.invert_yaxis()
    ax0.set_xlabel(f"top-{k} heads kept", fontsize=fs)
    ax0.tick_params(labelsize=fs)
    ax0.spines[["top", "right"]].set_visible(False)
    lim = float(np.abs(delta).max()) or 1.0
    sns.heatmap(delta, ax=ax1, cmap="vlag", vmin=-lim, vmax=lim, yticklabels=False,
                cbar_kws={"label": "relevance change (B - A)", "shrink": 0.8, "pad": 0.01})
    ax1.figure.axes[-1].tick_params(labelsize=fs * 0.9)
    ax1.figure.axes[-1].yaxis.label.set_size(fs)
    _layer_axis(ax1, a.head_names, "#555555", fs)
    fig.tight_layout()
    return _save(fig, out)


def _save(fig, out: Path) -> Path:
    plt = _plt()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, metadata={"Software": None})  # no version stamp: same figure, same bytes
    except OSError as exc:
        raise AuditorError(f"{out}: cannot write figure ({exc.strerror or exc})") from None
    finally:
        plt.close(fig)
    return out
