#!/usr/bin/env python3
"""Turn a pytest-benchmark JSON file into a short markdown report.

    python scripts/bench_report.py results.json > results.md

Machine info first, then one table per benchmark group: provider, median, the rates recorded by
``benches/benchlib.record`` (TFLOP/s, GB/s, % of peak, items/s, peak memory) and the ratio of
the best peer's median to ours (> 1 means ours is faster).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benches"))
from benchlib import format_time  # noqa: E402

# extra_info keys shown as rate columns, in this order: (key, column title)
RATE_COLUMNS = (
    ("tflops", "TFLOP/s"),
    ("pct_peak_flops", "% peak FLOP/s"),
    ("gbps", "GB/s"),
    ("pct_peak_bandwidth", "% peak BW"),
    ("peak_memory_mib", "peak mem MiB"),
)


def format_number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        if value == 0:
            return "0"
        if abs(value) >= 1e6:
            return f"{value:.3g}"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}"
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def machine_lines(data: dict[str, Any]) -> list[str]:
    info = data.get("machine_info") or {}
    ours = info.get("glm5v") or {}
    cpu = info.get("cpu") or {}
    commit = data.get("commit_info") or {}
    facts = [
        ("date", data.get("datetime")),
        ("gpu", ours.get("gpu")),
        ("device peak", (ours.get("device_peak") or {}).get("name")),
        ("cuda", ours.get("cuda")),
        ("torch", ours.get("torch")),
        ("triton", ours.get("triton")),
        ("cpu", cpu.get("brand_raw") or info.get("processor")),
        ("cores", cpu.get("count")),
        ("python", info.get("python_version")),
        ("system", " ".join(str(x) for x in (info.get("system"), info.get("release")) if x) or None),
        ("host", info.get("node")),
        ("commit", (commit.get("id") or "")[:12] + (" (dirty)" if commit.get("dirty") else "") or None),
        ("pytest-benchmark", data.get("version")),
    ]
    return [f"- {key}: {value}" for key, value in facts if value not in (None, "")]


def _item_rate(extra: dict[str, Any]) -> tuple[str, Any] | None:
    for key, value in extra.items():
        if key.endswith("_per_s") and key not in ("median_s",):
            return key[: -len("_per_s")] + "/s", value
    return None


def group_lines(name: str, benches: list[dict[str, Any]]) -> list[str]:
    def median(b: dict[str, Any]) -> float:
        m = (b.get("stats") or {}).get("median")
        return m if m is not None else float("inf")

    benches = sorted(benches, key=median)
    extras = [b.get("extra_info") or {} for b in benches]
    rate_cols = [(k, title) for k, title in RATE_COLUMNS if any(k in e for e in extras)]
    item_titles = sorted({r[0] for r in (_item_rate(e) for e in extras) if r})
    header = ["provider", "median"] + [title for _, title in rate_cols] + item_titles + ["vs best peer"]
    rows = []
    for b, extra in zip(benches, extras, strict=True):
        provider = str(extra.get("provider") or b.get("param") or b.get("name"))
        if extra.get("ours"):
            provider = f"**{provider}** (ours)"
        row = [provider, format_time((b.get("stats") or {}).get("median"))]
        row += [format_number(extra.get(k)) for k, _ in rate_cols]
        rate = _item_rate(extra)
        row += [format_number(rate[1]) if rate and rate[0] == t else "-" for t in item_titles]
        ratio = extra.get("ratio_to_best_peer")
        if ratio is None:
            row.append("-")
        else:
            cell = f"{ratio:.2f}x vs {extra.get('best_peer', 'peer')}"
            target = extra.get("target_ratio")
            if target is not None:
                cell += f" (target {target:g}x: {'met' if ratio >= target else 'not met'})"
            row.append(cell)
        rows.append(row)
    return [f"### {name}", "", *_table(header, rows), ""]


def render(data: dict[str, Any]) -> str:
    lines = ["# Benchmark results", "", *machine_lines(data), ""]
    groups: dict[str, list[dict[str, Any]]] = {}
    for b in data.get("benchmarks") or []:
        group = b.get("group") or (b.get("extra_info") or {}).get("group") or "(no group)"
        groups.setdefault(str(group), []).append(b)
    if not groups:
        lines += ["No benchmarks were recorded.", ""]
    lines.append("Ratio: best peer median / our median (> 1 means ours is faster).")
    lines.append("")
    for name, benches in groups.items():
        lines += group_lines(name, benches)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_file", help="file written by pytest --benchmark-json")
    args = parser.parse_args(argv)
    with open(args.json_file, encoding="utf-8") as fh:
        data = json.load(fh)
    sys.stdout.write(render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
