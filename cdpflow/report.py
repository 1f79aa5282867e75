"""`cdpflow report segments`: one self-contained HTML page a marketer can read, from a warehouse.

    cdpflow report segments --warehouse out/cdp.duckdb --out report.html [--registry PATH]

Reads the warehouse through the `Warehouse` interface (profiles and segment memberships) and the
promoted cluster model, if any, and writes one page (plotly.js embedded, so it opens offline):

1. segment sizes over time (open memberships each week);
2. the clusters' centroids: each feature of each cluster in standard deviations from the base;
3. an RFM heat map: profiles by recency of their last order and their number of orders, with
   their mean revenue;
4. flows between clusters: how many profiles moved from one cluster to another;
5. per segment, the share of members who opened an email, clicked one and ordered in the last
   90 days, against the whole base, with 95% Wilson intervals; a segment whose interval excludes
   the base's rate is marked as different from the base (it still means something), one that
   does not as indistinct (time to refine it).
"""
from __future__ import annotations

import html
import math
import time
from collections import Counter, defaultdict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from cdpflow.core.clusters import feature_vector, micros, number_of

RATES = (("opened", "email_opens_90d", "opened an email"), ("clicked", "email_clicks_90d", "clicked an email"),
         ("ordered", "orders_90d", "ordered"))
RECENCY = ((30, "0-30 days"), (90, "31-90"), (180, "91-180"), (365, "181-365"), (math.inf, "over a year"))
FREQUENCY = ((1, "1 order"), (2, "2"), (4, "3-4"), (9, "5-9"), (math.inf, "10+"))
WEEK_US = 7 * 86_400 * 1_000_000


def wilson(successes: int, n: int, z: float = 1.96) -> Tuple[float, float, float]:
    """(rate, low, high): the share and its Wilson score interval (95% by default)."""
    if n == 0:
        return 0.0, 0.0, 0.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return p, max(0.0, centre - half), min(1.0, centre + half)


def segment_rates(profiles: Sequence[Mapping[str, Any]], members: Mapping[str, Sequence[str]]
                  ) -> List[Dict[str, Any]]:
    """Per segment (and "all profiles" first): n, and per rate its share, interval and whether the
    interval excludes the base's share."""
    by_id = {p["profile_id"]: p for p in profiles}

    def rates_of(rows):
        out = {}
        for name, column, _ in RATES:
            out[name] = wilson(sum(1 for r in rows if number_of(r, column) > 0), len(rows))
        return out
    base = rates_of(list(by_id.values()))
    table = [{"segment": "all profiles", "n": len(by_id), **{k: v for k, v in base.items()}, "differs": {}}]
    for segment, ids in sorted(members.items()):
        rows = [by_id[i] for i in ids if i in by_id]
        rates = rates_of(rows)
        differs = {name: not (rates[name][1] <= base[name][0] <= rates[name][2]) for name, _, _ in RATES}
        table.append({"segment": segment, "n": len(rows), **rates, "differs": differs})
    return table


def sizes_over_time(memberships: Sequence[Mapping[str, Any]], limit: int = 12) -> Dict[str, List[Tuple[int, int]]]:
    """segment -> [(week start µs, open memberships then)], for the `limit` largest segments now."""
    if not memberships:
        return {}
    start = min(m["entered_at"] for m in memberships)
    end = max(max(m["entered_at"], m["exited_at"] or 0) for m in memberships)
    now = Counter(m["segment"] for m in memberships if m["exited_at"] is None)
    chosen = [s for s, _ in now.most_common(limit)]
    spans = defaultdict(list)
    for m in memberships:
        if m["segment"] in chosen:
            spans[m["segment"]].append((m["entered_at"], m["exited_at"]))
    weeks = list(range(start, end + WEEK_US, WEEK_US)) if end > start else [start]
    return {s: [(t, sum(1 for a, b in spans[s] if a <= t and (b is None or b > t))) for t in weeks] for s in chosen}


def cluster_flows(memberships: Sequence[Mapping[str, Any]]) -> Counter:
    """(from segment, to segment) -> profiles that left the first cluster for the second."""
    by_profile = defaultdict(list)
    for m in memberships:
        if m["source"] == "model":
            by_profile[m["profile_id"]].append(m)
    flows: Counter = Counter()
    for spans in by_profile.values():
        spans.sort(key=lambda m: (m["entered_at"], m["segment"]))
        for a, b in zip(spans, spans[1:]):
            if a["segment"] != b["segment"]:
                flows[(a["segment"], b["segment"])] += 1
    return flows


def rfm_grid(profiles: Sequence[Mapping[str, Any]]):
    """(recency labels, frequency labels, counts[r][f], mean revenue[r][f]) over the profiles with orders."""
    counts = [[0] * len(FREQUENCY) for _ in RECENCY]
    revenue = [[0.0] * len(FREQUENCY) for _ in RECENCY]
    for p in profiles:
        orders = number_of(p, "orders_total")
        if orders < 1:
            continue
        days = feature_vector(p, ("days_since_order",))[0]
        r = next(i for i, (top, _) in enumerate(RECENCY) if days <= top)
        f = next(i for i, (top, _) in enumerate(FREQUENCY) if orders <= top)
        counts[r][f] += 1
        revenue[r][f] += number_of(p, "revenue_total")
    means = [[revenue[r][f] / counts[r][f] if counts[r][f] else None for f in range(len(FREQUENCY))]
             for r in range(len(RECENCY))]
    return [label for _, label in RECENCY], [label for _, label in FREQUENCY], counts, means


def _date(us: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(us / 1e6))


def build_figures(profiles, memberships, model) -> List[Tuple[str, str, Any]]:
    """(title, what it says, plotly figure) for each plot of the page."""
    import plotly.graph_objects as go
    figures = []
    over_time = sizes_over_time(memberships)
    fig = go.Figure([go.Scatter(x=[_date(t) for t, _ in points], y=[n for _, n in points], mode="lines+markers",
                                name=segment)
                     for segment, points in over_time.items()])
    fig.update_layout(xaxis_title="week", yaxis_title="members", height=420)
    figures.append(("Segment sizes over time", "Open memberships at the start of each week, for the largest "
                    "segments now.", fig))
    if model is not None:
        features = list(model.features)
        fig = go.Figure(go.Heatmap(z=model.centers.tolist(), x=features, y=[c.name for c in model.components],
                                   colorscale="RdBu", zmid=0, colorbar={"title": "sd from base"}))
        fig.update_layout(height=120 + 40 * len(model.components), xaxis_tickangle=-40)
        figures.append((f"Cluster centroids (model {model.version})", "Each cluster's centre, feature by feature, in "
                        "standard deviations from the whole base (after the log of counts and money).", fig))
    recency, frequency, counts, means = rfm_grid(profiles)
    text = [[f"{c} profiles" + (f"<br>mean revenue {m:,.0f}" if m is not None else "") for c, m in zip(cr, mr)]
            for cr, mr in zip(counts, means)]
    fig = go.Figure(go.Heatmap(z=counts, x=frequency, y=recency, text=text, hoverinfo="text", colorscale="Blues",
                               colorbar={"title": "profiles"}))
    fig.update_layout(xaxis_title="orders (lifetime)", yaxis_title="last order", height=380)
    figures.append(("RFM", "Profiles with orders, by how long ago they last ordered and how many orders they made; "
                    "hover for their mean revenue.", fig))
    flows = cluster_flows(memberships)
    nodes = sorted({s for pair in flows for s in pair}) or ["(no moves yet)"]
    index = {s: i for i, s in enumerate(nodes)}
    fig = go.Figure(go.Sankey(node={"label": nodes}, link={"source": [index[a] for a, _ in flows],
                                                            "target": [index[b] for _, b in flows],
                                                            "value": list(flows.values())}))
    fig.update_layout(height=380)
    if not flows:
        fig.add_annotation(text="No profile has moved between clusters yet.", showarrow=False, x=0.5, y=0.5,
                           xref="paper", yref="paper", font={"size": 16})
    figures.append(("Flows between clusters", f"Profiles that left one cluster for another: {sum(flows.values())} "
                    "moves in the history kept.", fig))
    table = segment_rates(profiles, _members(memberships))
    fig = go.Figure()
    for name, _, words in RATES:
        fig.add_trace(go.Bar(name=words, x=[row["segment"] for row in table], y=[row[name][0] for row in table],
                             error_y={"type": "data", "symmetric": False,
                                      "array": [row[name][2] - row[name][0] for row in table],
                                      "arrayminus": [row[name][0] - row[name][1] for row in table]}))
    fig.update_layout(barmode="group", yaxis_tickformat=".0%", height=460, xaxis_tickangle=-30)
    figures.append(("Engagement and conversion by segment", "The share of members who opened, clicked or ordered "
                    "in the last 90 days, with 95% intervals; the first group is the whole base.", fig))
    return figures


def _members(memberships) -> Dict[str, List[str]]:
    members = defaultdict(list)
    for m in memberships:
        if m["exited_at"] is None:
            members[m["segment"]].append(m["profile_id"])
    return members


def _rates_table(table) -> str:
    head = "".join(f"<th>{html.escape(words)}</th>" for _, _, words in RATES)
    rows = []
    for row in table:
        cells = []
        for name, _, _ in RATES:
            p, low, high = row[name]
            mark = "" if row["segment"] == "all profiles" else (" ▲" if p > table[0][name][0] else " ▼") \
                if row["differs"].get(name) else ""
            cells.append(f"<td>{p:.1%} <small>({low:.1%}–{high:.1%})</small>{mark}</td>")
        verdict = ("" if row["segment"] == "all profiles" else
                   "differs from the base" if any(row["differs"].values()) else "indistinct: refine it")
        rows.append(f"<tr><td>{html.escape(row['segment'])}</td><td>{row['n']}</td>{''.join(cells)}"
                    f"<td>{verdict}</td></tr>")
    return (f"<table><tr><th>segment</th><th>members</th>{head}<th>verdict</th></tr>{''.join(rows)}</table>")


def write_report(warehouse: str, out: str, registry: Optional[str] = None) -> Dict[str, Any]:
    """Writes the page; returns what it holds (plots, segments, profiles)."""
    from cdpflow.models.registry import ModelRegistry
    from cdpflow.warehouse import open_warehouse
    with open_warehouse(warehouse, read_only=True) as wh:
        profiles, memberships = wh.profiles(), wh.memberships()
    model = ModelRegistry(registry).promoted_model() if registry else None
    figures = build_figures(profiles, memberships, model)
    table = segment_rates(profiles, _members(memberships))
    as_of = max((s for s in (micros(p.get("as_of")) for p in profiles) if s is not None), default=None)
    parts = []
    for i, (title, text, fig) in enumerate(figures):
        plot = fig.to_html(full_html=False, include_plotlyjs=(i == 0), div_id=f"plot-{i}",
                           config={"displaylogo": False, "responsive": True})
        parts.append(f"<section><h2>{html.escape(title)}</h2><p>{html.escape(text)}</p>{plot}</section>")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>cdpflow segments report</title>
<meta name="cdpflow-plots" content="{len(figures)}">
<style>body{{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}}
table{{border-collapse:collapse;font-size:.9em}}td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}
small{{color:#666}}section{{margin-bottom:2.5em}}</style></head><body>
<h1>Segments report</h1>
<p>{len(profiles)} profiles in {html.escape(str(warehouse))}, features as of {_date(int(as_of)) if as_of else '-'};
cluster model: {html.escape(model.version) if model else 'none promoted'}.</p>
{''.join(parts)}
<section><h2>Does each segment still mean something?</h2>
<p>Members who opened, clicked or ordered in the last 90 days, against the whole base (95% Wilson
intervals). ▲/▼: the interval lies above/below the base's rate.</p>{_rates_table(table)}</section>
</body></html>"""
    with open(out, "w", encoding="utf-8") as handle:
        handle.write(page)
    return {"plots": len(figures), "segments": len(table) - 1, "profiles": len(profiles), "out": out}
