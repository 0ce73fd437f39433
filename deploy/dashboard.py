"""The Grafana dashboard's queries, run against a Prometheus server, and drawn with matplotlib.

This is not Grafana: it evaluates every panel's PromQL (Grafana's variables
substituted) through Prometheus' HTTP API and plots the series, one subplot per
panel, to check the queries and to show what the dashboard shows.

    python deploy/dashboard.py --prometheus http://127.0.0.1:9090 --minutes 10 --out dashboard.png

Standard library only, plus matplotlib for :func:`render`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parent / "base" / "grafana" / "vision-serving-dashboard.json"


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    expr: str  # as in the dashboard
    legend: str


@dataclass(frozen=True)
class Series:
    labels: dict[str, str]
    times: list[float]
    values: list[float]


class QueryError(Exception):
    """Prometheus refused a query (a PromQL syntax or type error)."""


def load(path: Path = DASHBOARD) -> dict[str, Any]:
    return json.loads(path.read_text())


def queries(dashboard: dict[str, Any]) -> list[PanelQuery]:
    """Every target of every panel (rows hold none), in the dashboard's order."""
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append(PanelQuery(panel["title"], target["expr"], target.get("legendFormat", "")))
    return found


def substitute(expr: str, rate_interval: str) -> str:
    """The query as Grafana would send it: its range variables replaced."""
    return expr.replace("$__rate_interval", rate_interval).replace("$__interval", rate_interval)


def query_range(prometheus: str, expr: str, start: float, end: float, step: float) -> list[Series]:
    url = f"{prometheus}/api/v1/query_range?" + urllib.parse.urlencode(
        {"query": expr, "start": start, "end": end, "step": step}
    )
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            body = json.load(response)
    except urllib.error.HTTPError as exc:  # 400 for a bad query, with the reason in the body
        try:
            body = json.load(exc)
        except ValueError:
            raise exc from None  # no API answer (503 "Service Unavailable" while Prometheus starts)
    if body.get("status") != "success":
        raise QueryError(f"{expr}: {body.get('errorType')}: {body.get('error')}")
    return [
        Series(
            labels=item["metric"],
            times=[float(t) for t, _ in item["values"]],
            values=[float(v) for _, v in item["values"]],
        )
        for item in body["data"]["result"]
    ]


def has_data(series: list[Series]) -> bool:
    return any(math.isfinite(v) for s in series for v in s.values)


def legend(template: str, labels: dict[str, str]) -> str:
    text = template
    for key, value in labels.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def render(
    dashboard: dict[str, Any],
    prometheus: str,
    start: float,
    end: float,
    out: Path,
    *,
    rate_interval: str = "30s",
    note: str = "",
) -> None:
    """One subplot per panel, its series over [start, end], written to ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in dashboard["panels"] if p.get("targets")]
    columns = 3
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6 * columns, 3.2 * rows), squeeze=False)
    step = max(1.0, (end - start) / 240)
    for axis, panel in zip(axes.flat, panels, strict=False):
        axis.set_title(panel["title"], fontsize=10)
        plotted = 0
        for target in panel["targets"]:
            for series in query_range(prometheus, substitute(target["expr"], rate_interval), start, end, step):
                axis.plot(
                    [t - start for t in series.times],
                    series.values,
                    label=legend(target.get("legendFormat", ""), series.labels),
                    linewidth=1,
                    marker="." if len(series.values) < 20 else None,  # a short-lived series stays visible
                )
                plotted += 1
        if plotted:
            axis.legend(fontsize=7, loc="upper left")
        else:
            axis.text(0.5, 0.5, "no data", ha="center", va="center", transform=axis.transAxes, color="grey")
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        axis.set_xlim(0, end - start)
        axis.set_xlabel("seconds", fontsize=8)
        axis.set_ylabel({"s": "seconds", "ops": "per second", "reqps": "requests/s", "bytes": "bytes"}.get(unit, ""))
        axis.tick_params(labelsize=7)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(panels) :]:
        axis.axis("off")
    figure.suptitle(
        f"{dashboard['title']}: the dashboard's queries, evaluated by Prometheus and drawn with matplotlib "
        f"(not Grafana){note}",
        fontsize=11,
    )
    figure.tight_layout()
    figure.savefig(out, dpi=80)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--minutes", type=float, default=10.0, help="how far back to draw")
    parser.add_argument("--rate-interval", default="30s", help="what $__rate_interval stands for")
    parser.add_argument("--dashboard", type=Path, default=DASHBOARD)
    parser.add_argument("--out", type=Path, default=Path("dashboard.png"))
    args = parser.parse_args()
    end = time.time()
    render(
        load(args.dashboard), args.prometheus, end - args.minutes * 60, end, args.out, rate_interval=args.rate_interval
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
