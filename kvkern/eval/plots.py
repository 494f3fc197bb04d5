# SPDX-License-Identifier: Apache-2.0
"""PNG plots of quality against KV bytes (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (fewer bytes AND higher quality), by bytes."""
    front, best = [], float("-inf")
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def plot_demo(summary: list[dict], path: str | Path, *, title: str = "") -> Path:
    """KV bytes (x, MiB) against top-1 agreement with the full cache (y), one labelled point per method."""
    plt = _plt()
    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    xmax = max(r["kv_bytes"] for r in summary) / 2**20
    markers = "os^Dv<>pP*Xh"
    # A legend rather than labels on the points: methods at the same budget sit on top of each other.
    for i, r in enumerate(summary):
        x, y = r["kv_bytes"] / 2**20, r["top1_agreement"]
        name = "full (DynamicCache)" if r["method"] == "dynamic" else r["method"]
        ax.scatter([x], [y], s=55, marker=markers[i % len(markers)], alpha=0.85,
                   label=f"{name}: needle {r['hits']}/{r['prompts']}, KL {r['kl_mean']:.3g}")
    ax.legend(fontsize=7, loc="lower right", framealpha=0.9)
    ax.set_xlabel("KV cache (MiB)")
    ax.set_ylabel("top-1 agreement with the full cache")
    ax.set_ylim(min([0.0] + [r["top1_agreement"] for r in summary]) - 0.02, 1.05)
    ax.set_xlim(0, xmax * 1.3)
    ax.grid(alpha=0.3)
    ax.set_title(title or "kvkern demo: memory vs loyalty to the full cache (needle found k/n)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


EVAL_PANELS = (
    ("text_top1_agreement", "top-1 agreement (real text)", True),
    ("text_kl_mean", "mean KL(full || method), nats (real text)", False),
    ("ppl_rel_change", "perplexity change (relative)", False),
    ("needle_hit_rate", "needle hit rate", True),
)


def plot_eval(summary: list[dict], out_dir: str | Path, *, prefix: str = "eval") -> list[Path]:
    """One PNG per quality metric against KV bytes: a line per method over budgets, and the
    Pareto front over all (method, budget) points (dashed). Returns the written paths."""
    plt = _plt()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, label, higher_better in EVAL_PANELS:
        rows = [r for r in summary if r.get(key) is not None and r.get("kv_bytes", r.get("needle_kv_bytes")) is not None]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        pts = []
        for m in dict.fromkeys(r["method"] for r in rows):
            mr = sorted((r for r in rows if r["method"] == m), key=lambda r: r.get("kv_bytes", r.get("needle_kv_bytes")))
            xs = [r.get("kv_bytes", r.get("needle_kv_bytes")) / 2**20 for r in mr]
            ys = [r[key] for r in mr]
            ax.plot(xs, ys, marker="o", ms=4, label="full (DynamicCache)" if m == "dynamic" else m)
            pts += list(zip(xs, ys if higher_better else [-y for y in ys]))
        front = _pareto(pts)
        ax.plot([x for x, _ in front], [y if higher_better else -y for _, y in front], "k--", lw=0.8, label="Pareto front")
        if key == "text_kl_mean" and all(r[key] > 0 for r in rows):
            ax.set_yscale("log")
        ax.set_xlabel("KV cache (MiB)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        p = out_dir / f"{prefix}_{key}.png"
        fig.savefig(p)
        plt.close(fig)
        paths.append(p)
    return paths
