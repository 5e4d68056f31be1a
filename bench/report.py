"""What the benchmark found, in the three forms people read it: a printed table, JSON and a PNG chart.

Why medians and min-max spreads over interleaved rounds: on a 2-core machine where PostgreSQL, the
pooler and pgbench share the CPUs, one run says little; several rounds, with every system measured
back to back within each round, let machine noise hit all alike. The median is robust to one bad
round and the spread shows how much to trust it. Ratios are taken per round (pgshard against the
system measured next to it in the same round) and then summarised the same way, so a noisy round
shifts both sides of the ratio together.

Targets (DESIGN.md, "What good looks like") are checked here, after all sections ran, so a section
that was skipped or not selected shows SKIP and a figure whose runs failed shows FAIL, never a crash.

matplotlib is a development dependency only: it is imported when the chart is drawn, and a missing
matplotlib skips the chart with a message.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

Sample = float | None


@dataclass
class Stats:
    n: int
    failed: int
    median: float | None
    min: float | None
    max: float | None

    @classmethod
    def of(cls, samples: Iterable[Sample]) -> Stats:
        all_samples = list(samples)
        values = [v for v in all_samples if v is not None and math.isfinite(v)]
        if not values:
            return cls(len(all_samples), len(all_samples), None, None, None)
        return cls(
            len(all_samples),
            len(all_samples) - len(values),
            statistics.median(values),
            min(values),
            max(values),
        )


@dataclass
class Figure:
    """One measured quantity (for one system, one load), with one sample per round."""

    group: str  # the load, e.g. "simple, 16 clients"
    series: str  # who carried it, e.g. "pgshard", "direct", "PgBouncer 1.18.0"
    metric: str  # "throughput", "latency", "RSS", "query time", "routing cost"
    unit: str  # "tps", "ms", "us", "MB", "kB"
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def key(self) -> str:
        return f"{self.group}|{self.series}|{self.metric}"

    def add(self, value: Sample, error: str | None = None) -> None:
        self.samples.append(value)
        if error:
            self.errors.append(error)

    @property
    def stats(self) -> Stats:
        return Stats.of(self.samples)


@dataclass
class Ratio:
    """A ratio of two figures (or of derived values), per round."""

    name: str
    samples: list[Sample] = field(default_factory=list)
    note: str = ""
    detail: str = ""  # why there is no value, when there is none
    reference_failed: bool = False  # no value because the system pgshard is compared with failed

    @property
    def stats(self) -> Stats:
        return Stats.of(self.samples)


def paired(
    a: Figure | list[Sample], b: Figure | list[Sample], op: Callable[[float, float], float | None]
) -> list[Sample]:
    """Combine two figures round by round; a round where either failed gives None."""
    xs = a.samples if isinstance(a, Figure) else a
    ys = b.samples if isinstance(b, Figure) else b
    out: list[Sample] = []
    for x, y in zip(xs, ys, strict=False):
        out.append(None if x is None or y is None else op(x, y))
    return out


def divide(x: float, y: float) -> float | None:
    return x / y if y else None


@dataclass
class SectionResult:
    """Everything one section produced; `status` is "ok", "skipped: <reason>" or "failed: <reason>"."""

    name: str
    title: str
    status: str = "ok"
    figures: list[Figure] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def figure(self, group: str, series: str, metric: str, unit: str, note: str = "") -> Figure:
        """The figure with this (group, series, metric), created on first use."""
        for fig in self.figures:
            if (fig.group, fig.series, fig.metric) == (group, series, metric):
                return fig
        fig = Figure(group, series, metric, unit, note=note)
        self.figures.append(fig)
        return fig

    def find(self, group: str, series: str, metric: str) -> Figure | None:
        for fig in self.figures:
            if (fig.group, fig.series, fig.metric) == (group, series, metric):
                return fig
        return None

    def ratio(self, name: str, samples: list[Sample], note: str = "") -> Ratio:
        r = Ratio(name, samples, note)
        self.ratios = [x for x in self.ratios if x.name != name] + [r]
        return r

    def compare(
        self,
        name: str,
        pgshard: Figure,
        reference: Figure,
        op: Callable[[float, float], float | None] = divide,
        note: str = "",
    ) -> Ratio:
        """A per-round ratio of a pgshard figure to a reference; says which side failed if none."""
        r = self.ratio(name, paired(pgshard, reference, op), note)
        if r.stats.median is None:
            if reference.stats.median is None and pgshard.stats.median is not None:
                r.reference_failed = True
                r.detail = f"{reference.series} failed: {reference.errors[0] if reference.errors else '?'}"
            elif pgshard.stats.median is None:
                r.detail = f"{pgshard.series} failed: {pgshard.errors[0] if pgshard.errors else '?'}"
            else:
                r.detail = "no round where both succeeded"
        return r

    def find_ratio(self, name: str) -> Ratio | None:
        return next((r for r in self.ratios if r.name == name), None)

    @property
    def skipped(self) -> bool:
        return self.status.startswith("skipped")


# --------------------------------------------------------------------------------------------------
# Targets


@dataclass
class TargetSpec:
    section: str
    description: str
    kind: str  # "ratio" or "figure"
    name: str  # ratio name, or figure key "group|series|metric"
    op: str  # "<=", ">=", "<"
    threshold: float
    unit: str  # "x", "MB", "us"


@dataclass
class Target:
    description: str
    section: str
    status: str  # PASS, FAIL, SKIP
    value: float | None
    threshold: float
    op: str
    unit: str
    detail: str = ""


def target_specs() -> list[TargetSpec]:
    """The bars from DESIGN.md "What good looks like" and the benchmark issue."""
    specs = []
    for mode in ("simple", "extended", "prepared"):
        specs.append(
            TargetSpec(
                "single",
                f"pgbench -S 16 clients {mode}, one shard: pgshard >= 1.0x PgBouncer (tps)",
                "ratio",
                f"pgshard/PgBouncer tps, {mode}, 16 clients",
                ">=",
                1.0,
                "x",
            )
        )
    for mode in ("simple", "extended", "prepared"):
        specs.append(
            TargetSpec(
                "single",
                f"pgbench -S 1 client {mode}: latency pgshard adds <= 1.5x what PgBouncer adds",
                "ratio",
                f"added latency pgshard/PgBouncer, {mode}, 1 client",
                "<=",
                1.5,
                "x",
            )
        )
    for protocol in ("simple", "extended"):
        specs.append(
            TargetSpec(
                "routing",
                f"routing cost on a route-cache hit, {protocol} protocol <= 10 us",
                "figure",
                f"route-cache hit|{protocol}|routing cost",
                "<=",
                10.0,
                "us",
            )
        )
    specs.append(
        TargetSpec(
            "memory",
            "pgshard RSS with 10,000 idle clients < 300 MB",
            "figure",
            "10000 idle clients|pgshard|RSS",
            "<",
            300.0,
            "MB",
        )
    )
    specs.append(
        TargetSpec(
            "crossshard",
            "cross-shard count(*) over 4 shards <= 1.2x single server (time)",
            "ratio",
            "pgshard 4 shards/single server time, count(*)",
            "<=",
            1.2,
            "x",
        )
    )
    return specs


_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": lambda v, t: v <= t,
    ">=": lambda v, t: v >= t,
    "<": lambda v, t: v < t,
}


def evaluate_targets(sections: dict[str, SectionResult]) -> list[Target]:
    """PASS/FAIL/SKIP for every target; a target whose pgshard figure failed is a FAIL."""
    out = []
    for spec in target_specs():

        def verdict(status: str, value: float | None, detail: str = "", spec: TargetSpec = spec) -> Target:
            return Target(
                spec.description, spec.section, status, value, spec.threshold, spec.op, spec.unit, detail
            )

        section = sections.get(spec.section)
        if section is None:
            out.append(verdict("SKIP", None, "section not run"))
            continue
        if section.status != "ok":
            skip = section.skipped or section.status == "failed: interrupted"
            out.append(verdict("SKIP" if skip else "FAIL", None, section.status))
            continue
        thing: Ratio | Figure | None = (
            section.find_ratio(spec.name) if spec.kind == "ratio" else section.find(*spec.name.split("|"))
        )
        if thing is None:
            out.append(verdict("SKIP", None, f"not measured: {spec.name}"))
            continue
        value = thing.stats.median
        if value is None:
            if isinstance(thing, Ratio):
                out.append(
                    verdict("SKIP" if thing.reference_failed else "FAIL", None, thing.detail or "no value")
                )
            else:
                errors = thing.errors
                out.append(verdict("FAIL", None, "all runs failed" + (f": {errors[0]}" if errors else "")))
            continue
        out.append(verdict("PASS" if _OPS[spec.op](value, spec.threshold) else "FAIL", value))
    return out


# --------------------------------------------------------------------------------------------------
# Printing


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit == "x":
        return f"{value:.2f}x"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _spread(stats: Stats, unit: str = "") -> str:
    if stats.min is None or stats.max is None:
        return "-"
    return f"{_fmt(stats.min, unit)} - {_fmt(stats.max, unit)}"


def _runs(stats: Stats) -> str:
    return f"{stats.n - stats.failed}/{stats.n}"


def format_table(meta: dict[str, Any], sections: dict[str, SectionResult], targets: list[Target]) -> str:
    lines: list[str] = []
    opts = meta.get("options", {})
    lines.append(
        f"pgshard benchmark {meta.get('started', '')}: {meta.get('cpus', '?')} CPUs, "
        f"rounds={opts.get('rounds')} duration={opts.get('duration')}s scale={opts.get('scale')} "
        f"pool_size={opts.get('pool_size')}; {meta.get('pgbouncer', {}).get('label', 'PgBouncer: n/a')}, "
        f"{meta.get('postgres', '')}"
    )
    compiled = meta.get("pgshard_compiled")
    if compiled is not None:
        lines.append(
            f"pgshard hot path: compiled with mypyc ({len(compiled)} modules)"
            if compiled
            else "pgshard hot path: pure Python (not compiled; see proxy/native.py)"
        )
    if meta.get("pgshard_stale_compiled"):
        lines.append(
            f"warning: {', '.join(meta['pgshard_stale_compiled'])} changed after they were compiled: "
            "the figures are of the old code (run `pip install -e .` again)"
        )
    load = meta.get("loadavg_start")
    cpus = meta.get("cpus") or 1
    if load and load[0] > 0.5 * cpus:
        lines.append(
            f"warning: the machine was busy before the run (load average {load[0]:.1f} on {cpus} CPUs): "
            "other work competes with every system measured, so figures are noisier than usual"
        )
    for section in sections.values():
        lines.append("")
        lines.append(f"== {section.name}: {section.title} [{section.status}] ({section.seconds:.0f}s)")
        for note in section.notes:
            lines.append(f"   note: {note}")
        if section.figures:
            width_g = max(len(f.group) for f in section.figures)
            width_s = max(len(f.series) for f in section.figures)
            width_m = max(len(f"{f.metric} ({f.unit})") for f in section.figures)
            head = f"   {'load':<{width_g}}  {'through':<{width_s}}  {'figure':<{width_m}}"
            lines.append(f"{head}  {'median':>10}  {'spread (min - max)':>22}  runs")
            for fig in section.figures:
                st = fig.stats
                mark = " *" if fig.note else ""
                what = f"{fig.metric} ({fig.unit})"
                row = f"   {fig.group:<{width_g}}  {fig.series:<{width_s}}  {what:<{width_m}}"
                median = _fmt(st.median) if st.median is not None else "FAILED"
                lines.append(f"{row}  {median:>10}  {_spread(st):>22}  {_runs(st)}{mark}")
                if fig.errors:
                    lines.append(f"      ! {len(fig.errors)} failed run(s): {fig.errors[0][:300]}")
        if section.ratios:
            width_r = max(len(r.name) for r in section.ratios)
            lines.append(f"   {'ratio':<{width_r}}  {'median':>10}  {'spread (min - max)':>22}")
            for r in section.ratios:
                st = r.stats
                median = _fmt(st.median, "x") if st.median is not None else "n/a"
                mark = " *" if r.note else ""
                lines.append(f"   {r.name:<{width_r}}  {median:>10}  {_spread(st, 'x'):>22}{mark}")
                if st.median is None and r.detail:
                    lines.append(f"      ! {r.detail[:300]}")
        notes = sorted(
            {f.note for f in section.figures if f.note} | {r.note for r in section.ratios if r.note}
        )
        for note in notes:
            lines.append(f"   * {note}")
    lines.append("")
    lines.append("== targets")
    for t in targets:
        value = (
            "-"
            if t.value is None
            else (_fmt(t.value, t.unit) if t.unit == "x" else f"{_fmt(t.value)} {t.unit}")
        )
        bar = f"{t.op} {_fmt(t.threshold, t.unit) if t.unit == 'x' else f'{t.threshold:g} {t.unit}'}"
        detail = f"  ({t.detail[:200]})" if t.detail else ""
        lines.append(f"   {t.status:<4}  {t.description}: measured {value} (bar {bar}){detail}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# JSON and PNG


def to_json(
    meta: dict[str, Any], sections: dict[str, SectionResult], targets: list[Target]
) -> dict[str, Any]:
    out_sections: dict[str, Any] = {}
    for name, section in sections.items():
        out_sections[name] = {
            "title": section.title,
            "status": section.status,
            "seconds": round(section.seconds, 1),
            "notes": section.notes,
            "figures": [
                {
                    "key": fig.key,
                    "group": fig.group,
                    "series": fig.series,
                    "metric": fig.metric,
                    "unit": fig.unit,
                    "samples": fig.samples,
                    "errors": fig.errors,
                    "note": fig.note,
                    **asdict(fig.stats),
                }
                for fig in section.figures
            ],
            "ratios": [
                {
                    "name": r.name,
                    "samples": r.samples,
                    "note": r.note,
                    "detail": r.detail,
                    "reference_failed": r.reference_failed,
                    **asdict(r.stats),
                }
                for r in section.ratios
            ],
        }
    return {"meta": meta, "sections": out_sections, "targets": [asdict(t) for t in targets]}


def write_json(data: dict[str, Any], out_dir: Path, stamp: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    latest = out_dir / "latest.json"
    latest.write_text(json.dumps(data, indent=2) + "\n")
    stamped = out_dir / f"bench-{stamp}.json"
    shutil.copyfile(latest, stamped)
    return [latest, stamped]


def write_chart(sections: dict[str, SectionResult], out_dir: Path, stamp: str) -> tuple[list[Path], str]:
    """Grouped bars (median, min-max whiskers) per section and metric; ([paths], message)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "chart skipped: matplotlib is not installed (pip install 'pgshard[bench]')"
    panels: list[tuple[str, str, str, list[Figure]]] = []
    for section in sections.values():
        by_metric: dict[tuple[str, str], list[Figure]] = {}
        for fig in section.figures:
            by_metric.setdefault((fig.metric, fig.unit), []).append(fig)
        for (metric, unit), figs in by_metric.items():
            panels.append((section.name, metric, unit, figs))
    if not panels:
        return [], "chart skipped: no figures"
    cols = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / cols)
    fig_obj, axes = plt.subplots(rows, cols, figsize=(7.5 * cols, 4.2 * rows), squeeze=False)
    for ax, (section_name, metric, unit, figs) in zip(axes.flat, panels, strict=False):
        groups = list(dict.fromkeys(f.group for f in figs))
        series = list(dict.fromkeys(f.series for f in figs))
        width = 0.8 / max(1, len(series))
        for i, name in enumerate(series):
            xs, heights, lows, highs = [], [], [], []
            for j, group in enumerate(groups):
                found = next((f for f in figs if f.group == group and f.series == name), None)
                st = found.stats if found is not None else None
                if st is None or st.median is None or st.min is None or st.max is None:
                    continue
                xs.append(j - 0.4 + width * (i + 0.5))
                heights.append(st.median)
                lows.append(st.median - st.min)
                highs.append(st.max - st.median)
            if xs:
                ax.bar(xs, heights, width, yerr=[lows, highs], capsize=3, label=name)
            for j, group in enumerate(groups):
                found = next((f for f in figs if f.group == group and f.series == name), None)
                if found is not None and found.stats.median is None:
                    x = j - 0.4 + width * (i + 0.5)
                    style = {"rotation": 90, "ha": "center", "va": "bottom", "fontsize": 7, "color": "red"}
                    ax.text(x, 0, f"{name}: failed", **style)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(f"{metric} ({unit})")
        ax.set_title(f"{section_name}: {metric}", fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig_obj.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    latest = out_dir / "latest.png"
    fig_obj.savefig(latest, dpi=110)
    plt.close(fig_obj)
    stamped = out_dir / f"bench-{stamp}.png"
    shutil.copyfile(latest, stamped)
    return [latest, stamped], f"chart written to {latest}"
