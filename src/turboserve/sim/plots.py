"""PNG plots of a simulation (matplotlib, Agg backend: no display needed).

In: per policy its chunk latencies as (values_ms, counts), its provisioned-GPU step series
and its cost; the demand in GPUs over time (from the oracle's nominal schedule).
Out: three files in a directory — `latency_cdf.png`, `gpus_over_time.png`, `cost.png` —
and the list of their paths.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


# tab10 without its grey, which the demand curve and reference lines use: one colour per
# policy, the same in every plot
_POLICY_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
                  "tab:pink", "tab:olive", "tab:cyan", "navy", "gold", "teal")


def _color(i: int) -> str:
    return _POLICY_COLORS[i % len(_POLICY_COLORS)]


def latency_cdf(path: Path, latencies: dict[str, tuple[np.ndarray, np.ndarray]], slo_ms: float) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (policy, (vals, counts)) in enumerate(latencies.items()):
        if vals.size == 0:
            continue
        order = np.argsort(vals, kind="stable")
        v = vals[order]
        cum = np.cumsum(counts[order])
        ax.plot(v, cum / cum[-1], label=policy, drawstyle="steps-post", color=_color(i))
    ax.axvline(slo_ms, color="k", linestyle="--", linewidth=1, label=f"SLO {slo_ms:.0f} ms")
    ax.set_xlabel("per-chunk latency (ms)")
    ax.set_ylabel("fraction of chunks")
    ax.set_title("Per-chunk latency CDF")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gpus_over_time(path: Path, series: dict[str, list[tuple[float, int, int]]],
                   demand: tuple[np.ndarray, np.ndarray] | None, end_s: float) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if demand is not None and demand[0].size:
        t, frac = demand
        ax.step(np.append(t, end_s) / 60.0, np.append(frac, frac[-1]), where="post", color="0.35",
                linewidth=1.0, label="demand (GPUs at the SLO, perfect packing)")
    for i, (policy, pts) in enumerate(series.items()):
        t = np.array([p[0] for p in pts] + [end_s])
        prov = np.array([p[1] for p in pts] + [pts[-1][1]])
        ax.step(t / 60.0, prov, where="post", label=policy, color=_color(i), linewidth=1.4)
    ax.set_xlabel("time (min)")
    ax.set_ylabel("GPUs provisioned")
    ax.set_title("GPUs over time against demand")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cost_bars(path: Path, costs_usd: dict[str, float], lower_bound_usd: float | None) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(costs_usd)
    ax.bar(range(len(names)), [costs_usd[n] for n in names], color="tab:blue")
    if lower_bound_usd is not None:
        ax.axhline(lower_bound_usd, color="k", linestyle="--", linewidth=1, label="oracle lower bound")
        ax.legend(fontsize=8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("cost (USD)")
    ax.set_title("Cost per policy")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(out_dir: str | Path, latencies: dict[str, tuple[np.ndarray, np.ndarray]],
                gpu_series: dict[str, list[tuple[float, int, int]]], costs_usd: dict[str, float],
                slo_ms: float, end_s: float, demand: tuple[np.ndarray, np.ndarray] | None = None,
                lower_bound_usd: float | None = None) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "latency_cdf.png", out / "gpus_over_time.png", out / "cost.png"]
    latency_cdf(paths[0], latencies, slo_ms)
    gpus_over_time(paths[1], gpu_series, demand, end_s)
    cost_bars(paths[2], costs_usd, lower_bound_usd)
    return paths
