"""PNG plots of the pooled tables (matplotlib's Agg canvas; pyplot and the global backend are
left alone, so importing this in a notebook changes nothing).

Rates are drawn in percent. Bit axes run from the sign bit (left) to bit 0 (right).
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from analysis.tables import FORMATS, INT_FORMATS, field_bits, group_title, groups, row_formats

PathArg = Union[str, Path]
ZERO_COLOR, EMPTY_COLOR = "#c8c8c8", "#ffffff"


def _save(fig: Figure, path: PathArg) -> Path:
    """Render with the Agg canvas and write a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=110)
    return path


def _check(table: pd.DataFrame, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{what} needs column(s) {missing}")
    if table.empty:
        raise ValueError(f"{what}: the table is empty")


def _site_labels(rows: pd.DataFrame) -> list[str]:
    return [f"#{int(k)} {t}" for k, t in zip(rows["site_index"], rows["site_type"])]


def plot_site_rates(site_table: pd.DataFrame, path: PathArg) -> Path:
    """Misclassification rate per site with Wilson 95% error bars; one panel per identity."""
    _check(site_table, ("site_index", "site_type", "misclassification_rate", "ci_low", "ci_high"), "plot_site_rates")
    parts = groups(site_table)
    most = max(len(rows) for _, rows in parts)
    fig = Figure(figsize=(min(26.0, max(7.0, 0.28 * most + 2.0)), 3.6 * len(parts) + 0.4), layout="constrained")
    for (ident, rows), ax in zip(parts, fig.subplots(len(parts), 1, squeeze=False)[:, 0]):
        rows = rows.sort_values("site_index")
        x = np.arange(len(rows))
        rate = 100 * rows["misclassification_rate"].to_numpy(float)
        low, high = 100 * rows["ci_low"].to_numpy(float), 100 * rows["ci_high"].to_numpy(float)
        ax.bar(x, np.nan_to_num(rate), width=0.7, color="#4c72b0", alpha=0.35)
        ax.errorbar(x, rate, yerr=[rate - low, high - rate], fmt="o", color="#1f3b73", ms=4, capsize=3,
                    elinewidth=1, label="pooled rate, Wilson 95% interval")
        ax.set_xticks(x, _site_labels(rows), rotation=90 if len(rows) > 6 else 0, fontsize=8)
        ax.set_xlim(-0.6, len(rows) - 0.4)
        tallest = np.nanmax(np.concatenate([high, rate, [0.0]]))
        ax.set_ylim(0, tallest * 1.25 if tallest > 0 else 1.0)  # headroom for the legend
        ax.set_xlabel("fault site (layer # and type, forward order)")
        ax.set_ylabel("misclassification rate (%)")
        ax.set_title(f"Misclassification rate per site\n{group_title(ident, rows)}", fontsize=11)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="upper right", fontsize=8, framealpha=0.9)
    return _save(fig, path)


def _format_width(fmt: str) -> int | None:
    return FORMATS[fmt][0] if fmt in FORMATS else INT_FORMATS[fmt][0] if fmt in INT_FORMATS else None


def _bit_range(rows: pd.DataFrame) -> tuple[int, str | None]:
    """(width, format) of a group: the widest element format among its rows (the mode, or an
    fp8 / int8 format: tables.element_format), the format if there is one."""
    formats = sorted(set(row_formats(rows.dropna(subset=["mode"])))) if "mode" in rows else []
    widths = [_format_width(f) for f in formats if _format_width(f)]
    width = max(widths) if widths else int(rows["bit"].max()) + 1
    return width, formats[0] if len(formats) == 1 and _format_width(formats[0]) else None


def _field_marks(ax, mode: str, vertical: bool = True) -> None:
    """Dashed lines between sign / exponent / mantissa (int8: sign / magnitude) and their names above the axes."""
    fields = ("sign", "exponent", "mantissa") if mode in FORMATS else ("sign", "magnitude")[not INT_FORMATS[mode][1]:]
    for field in fields:
        high, low = field_bits(mode, field)
        centre = (high + low) / 2
        ax.text(centre, 1.01, field, transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=8, color="#444444")
        if field != fields[-1]:
            ax.axvline(low - 0.5, color="#444444", lw=0.8, ls="--")


def plot_site_bit_heatmap(site_bit_table: pd.DataFrame, path: PathArg) -> Path:
    """Site x bit heatmap of the misclassification rate (log colour scale; grey = 0, white = no
    data); one panel per identity."""
    _check(site_bit_table, ("site_index", "site_type", "bit", "misclassification_rate"), "plot_site_bit_heatmap")
    parts = groups(site_bit_table)
    heights = [max(2.0, 0.24 * rows["site_index"].nunique() + 1.4) for _, rows in parts]
    fig = Figure(figsize=(11.0, sum(heights) + 0.4), layout="constrained")
    axes = fig.subplots(len(parts), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    positive = site_bit_table["misclassification_rate"].to_numpy(float)
    positive = positive[np.isfinite(positive) & (positive > 0)] * 100
    norm = LogNorm(vmin=positive.min(), vmax=max(positive.max(), positive.min() * 10)) if positive.size else LogNorm(1e-3, 100)
    image = None
    for (ident, rows), ax in zip(parts, axes):
        width, mode = _bit_range(rows)
        sites = rows[["site_index", "site_type"]].drop_duplicates("site_index").sort_values("site_index")
        row_of = {int(k): i for i, k in enumerate(sites["site_index"])}
        grid = np.full((len(sites), width), np.nan)
        for k, b, r in zip(rows["site_index"], rows["bit"], rows["misclassification_rate"]):
            grid[row_of[int(k)], width - 1 - int(b)] = 100 * r  # column 0 = the top bit
        background = np.ones(grid.shape + (4,))
        background[grid == 0] = (*(int(ZERO_COLOR[i:i + 2], 16) / 255 for i in (1, 3, 5)), 1.0)
        extent = (width - 0.5, -0.5, len(sites) - 0.5, -0.5)
        ax.imshow(background, extent=extent, aspect="auto", interpolation="nearest")
        shown = np.ma.masked_where(~np.isfinite(grid) | (grid <= 0), grid)
        image = ax.imshow(shown, extent=extent, aspect="auto", interpolation="nearest", cmap="viridis", norm=norm)
        ax.set_yticks(np.arange(len(sites)), _site_labels(sites), fontsize=7 if len(sites) > 30 else 8)
        ax.set_xticks(np.arange(width - 1, -1, -1), [str(b) for b in range(width - 1, -1, -1)], fontsize=7)
        ax.set_xlabel("bit position (LSB = 0)")
        ax.set_ylabel("fault site (layer #)")
        if mode:
            _field_marks(ax, mode)
        ax.set_title(f"Misclassification rate per site and bit: {group_title(ident, rows)}", pad=16)
    colorbar = fig.colorbar(image, ax=list(axes), shrink=min(1.0, 6.0 / sum(heights) + 0.3), pad=0.01)
    colorbar.set_label("misclassification rate (%, log scale; grey = 0, white = not run)")
    return _save(fig, path)


def _common_title(idents: list[dict]) -> str:
    """The identity values all series share, e.g. 'resnet20 / cifar10' (legend tells the rest)."""
    shared = [str(idents[0][c]) + (" faults" if c == "kind" else "") for c in ("model", "dataset", "mode", "kind")
              if idents[0].get(c) and all(i.get(c) == idents[0].get(c) for i in idents)]
    return " / ".join(shared) + f" ({len(idents)} series)" if shared else f"{len(idents)} series"


def plot_bit_rates(bit_table: pd.DataFrame, path: PathArg) -> Path:
    """Misclassification rate per bit position on a log y scale with Wilson 95% bars; one series
    per identity. A zero rate is drawn as an open triangle on the axis floor, its bar reaching
    the Wilson upper bound."""
    _check(bit_table, ("bit", "misclassification_rate", "ci_low", "ci_high"), "plot_bit_rates")
    parts = groups(bit_table)
    width, mode = _bit_range(bit_table)
    rates = 100 * bit_table[["misclassification_rate", "ci_low", "ci_high"]].to_numpy(float)
    positive = rates[np.isfinite(rates) & (rates > 0)]
    floor = 10 ** (np.floor(np.log10(positive.min())) - 1) if positive.size else 1e-3  # a decade below the data
    top = min(100.0 * 1.8, positive.max() * 1.8) if positive.size else 100.0
    fig = Figure(figsize=(11.0, 5.2), layout="constrained")
    ax = fig.subplots()
    if mode in FORMATS:
        _, low = field_bits(mode, "exponent")
        ax.axvspan(width - 1.5, low - 0.5, color="#f2e6c9", alpha=0.6, lw=0)
    if mode:
        _field_marks(ax, mode)
    colors = [f"C{i % 10}" for i in range(len(parts))]
    offsets = np.linspace(-0.2, 0.2, len(parts)) if len(parts) > 1 else [0.0]
    any_zero = False
    for (ident, rows), color, dx in zip(parts, colors, offsets):
        rows = rows.sort_values("bit")
        x = rows["bit"].to_numpy(float) + dx
        rate, low, high = (100 * rows[c].to_numpy(float) for c in ("misclassification_rate", "ci_low", "ci_high"))
        zero = rate == 0
        shown = np.where(zero, floor, rate)
        low = np.maximum(np.where(np.isfinite(low), low, shown), floor)
        ax.errorbar(x[~zero], shown[~zero], yerr=[shown[~zero] - low[~zero], high[~zero] - shown[~zero]], fmt="o-",
                    color=color, ms=4, lw=1, capsize=2, label=group_title(ident, rows))
        if zero.any():
            ax.errorbar(x[zero], shown[zero], yerr=[np.zeros(zero.sum()), high[zero] - floor], fmt="v", mfc="none",
                        color=color, ms=6, capsize=2)
            any_zero = True
    if any_zero:
        ax.plot([], [], "v", mfc="none", color="0.35", label="rate 0 (drawn at floor; bar = Wilson upper bound)")
    ax.set_yscale("log")
    ax.set_ylim(floor / 1.5, top)
    ax.set_xlim(width - 0.5, -0.5)
    ax.set_xticks(np.arange(width - 1, -1, -1))
    ax.tick_params(axis="x", labelsize=8)
    ax.set_xlabel("bit position (LSB = 0)")
    ax.set_ylabel("misclassification rate (%, log scale)")
    title = group_title(*parts[0]) if len(parts) == 1 else _common_title([ident for ident, _ in parts])
    ax.set_title(f"Misclassification rate per flipped bit: {title}", pad=16)
    ax.grid(which="major", axis="y", alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    return _save(fig, path)
