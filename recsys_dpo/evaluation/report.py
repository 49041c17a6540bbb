"""The evaluation stage's output directory: numbers, per-user rows, top-K lists, report, plots.

    metrics.json      aggregates of each model, deltas with CIs, counts, config
    per_user.parquet  user_id (original) + per-user metrics of each model (+ deltas, kl)
    topk.parquet      user_id, rank (1..K), item_id, score: the evaluated model's (the policy's)
                      top-K lists in ORIGINAL ids
    report.md         tables of both models, deltas with CIs and a significance mark
    *.png             HR@K / NDCG@K curves over K, KL histogram, popularity of recommendations
    manifest.json     written last (recsys_dpo.artifacts), so a killed run leaves no output

Everything is written in a temporary sibling directory renamed into place (`atomic_dir`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from rich.table import Table  # noqa: E402

from recsys_dpo.artifacts import (  # noqa: E402
    atomic_dir,
    config_hash,
    content_hash,
    file_sha256,
    read_manifest,
    write_manifest,
)
from recsys_dpo.data.schema import USER_IDX  # noqa: E402
from recsys_dpo.data.vocab import Vocab, decode_items  # noqa: E402
from recsys_dpo.evaluation.evaluator import Comparison, EvalResult  # noqa: E402
from recsys_dpo.retrieval.index import EMPTY_ITEM  # noqa: E402

Outcome = EvalResult | Comparison


def _models(outcome: Outcome) -> dict[str, EvalResult]:
    """The evaluated models by role: {"policy", "reference"} or {"model"}."""
    if isinstance(outcome, Comparison):
        return {"policy": outcome.policy, "reference": outcome.reference}
    return {"model": outcome}


def _main(outcome: Outcome) -> EvalResult:
    """The model whose top-K lists are exported: the policy, or the only model."""
    return outcome.policy if isinstance(outcome, Comparison) else outcome


def _with_user_ids(table: pl.DataFrame, vocab: Vocab) -> pl.DataFrame:
    users = vocab.users.select(pl.col(USER_IDX).cast(pl.Int64), "user_id")
    return table.join(users, on=USER_IDX, how="left").select("user_id", pl.exclude("user_id"))


def topk_frame(result: EvalResult, vocab: Vocab) -> pl.DataFrame:
    """user_id, rank (1-based), item_id, score in original ids; empty slots (-1) dropped."""
    n_users, k = result.topk_items.shape
    frame = pl.DataFrame({
        USER_IDX: np.repeat(result.per_user[USER_IDX].to_numpy(), k),
        "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), n_users),
        "item_idx": result.topk_items.reshape(-1),
        "score": result.topk_scores.reshape(-1),
    }).filter(pl.col("item_idx") != EMPTY_ITEM)  # fmt: skip
    frame = frame.with_columns(decode_items(frame["item_idx"], vocab).alias("item_id"))
    return _with_user_ids(frame, vocab).select("user_id", "rank", "item_id", "score")


def metrics_payload(outcome: Outcome, config: dict[str, Any]) -> dict[str, Any]:
    """The content of metrics.json."""
    main = _main(outcome)
    payload: dict[str, Any] = {
        "split": main.split,
        "k": main.ks,
        "models": {role: r.aggregates for role, r in _models(outcome).items()},
        "counts": main.counts,
        "config": config,
        "config_hash": config_hash(config),
    }
    if isinstance(outcome, Comparison):
        payload["ci"] = outcome.ci
        payload["comparison"] = outcome.aggregates
        payload["deltas"] = {
            name: {"mean": d.mean, "lo": d.lo, "hi": d.hi, "significant": d.significant}
            for name, d in outcome.deltas.items()
        }
    if outcome.ope is not None:
        payload["ope"] = outcome.ope
    return payload


def _fmt(value: float) -> str:
    return "n/a" if value is None or np.isnan(value) else f"{value:.4f}"


def metric_rows(outcome: Outcome) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the metric table: one row per aggregate metric, one column per model,
    plus delta, CI and a significance mark (*) for a comparison."""
    models = _models(outcome)
    header = ["metric", *models]
    names = list(_main(outcome).aggregates)
    if isinstance(outcome, Comparison):
        header += ["delta", f"{outcome.ci:.0%} CI", "sig."]
        names += [n for n in outcome.aggregates if n not in names]
    rows = []
    for name in names:
        row = [name, *(_fmt(r.aggregates.get(name, float("nan"))) for r in models.values())]
        if isinstance(outcome, Comparison):
            if name in outcome.aggregates:  # comparison-only numbers (kl, reward margin)
                row[1:3] = [_fmt(outcome.aggregates[name]), ""]
            delta = outcome.deltas.get(name)
            row += (
                ["", "", ""]
                if delta is None
                else [f"{delta.mean:+.4f}", f"[{delta.lo:+.4f}, {delta.hi:+.4f}]",
                      "*" if delta.significant else ""]
            )  # fmt: skip
        rows.append(row)
    return header, rows


def ope_note(section: dict) -> str:
    """One paragraph on the off-policy rows: how the candidate was served, on what, and the
    diagnostics; or why there are none."""
    if "skipped" in section:
        return f"No off-policy estimate: {section['skipped']}."
    policy, counts = section["policy"], section["counts"]
    served = (f"epsilon-greedy around its top-{counts['slots']} (epsilon {policy['epsilon']})"
              if policy["kind"] == "epsilon_greedy"
              else f"Plackett-Luce at temperature {policy['temperature']}")
    diag = "; ".join(
        f"{role}: ESS {d['diagnostics']['ess']:,.0f} ({d['diagnostics']['ess_share']:.1%}), max "
        f"weight {d['diagnostics']['max_weight']:.1f}, never shown "
        f"{d['diagnostics']['zero_support_share']:.1%}"
        for role, d in section["models"].items()
    )
    return (f"ope/: each model served {served} on the {counts['requests']:,} logged requests "
            f"(logged CTR {section['logged_ctr']:.4f}; clip {policy['clip']}); {diag}. "
            "ope/exact_ctr is the true value under the simulator's click model. The direct "
            "method's CI holds its reward model fixed, so it is too narrow.")


def ope_summary(metrics: dict[str, Any], estimator: str = "snips") -> str | None:
    """One line from metrics.json: each model's off-policy click-through rate by `estimator`
    with its CI, the lift, and the simulator's exact values when known; None without OPE."""
    section = metrics.get("ope")
    if section is None or "skipped" in section:
        return None
    parts = []
    for role, values in section["models"].items():
        e = values["estimates"][estimator]
        parts.append(f"{role} {e['value']:.4f} [{e['lo']:.4f}, {e['hi']:.4f}]")
    line = f"online CTR, off-policy ({estimator}, {metrics.get('ci', 0.95):.0%} CI): " + ", ".join(parts)
    if "lift" in section:
        lift = section["lift"][estimator]
        line += f"; lift {lift['value']:+.4f} [{lift['lo']:+.4f}, {lift['hi']:+.4f}]"
    exact = {role: v["exact_ctr"] for role, v in section["models"].items()
             if v.get("exact_ctr") is not None}
    if exact:
        line += "; exact (simulator): " + ", ".join(f"{r} {v:.4f}" for r, v in exact.items())
    return line


def summary_table(outcome: Outcome) -> Table:
    """The metric table for the console."""
    header, rows = metric_rows(outcome)
    table = Table(title=f"evaluation on {_main(outcome).split}")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def markdown(outcome: Outcome, plots: list[str]) -> str:
    """report.md: counts, the metric table, the plots."""
    main = _main(outcome)
    header, rows = metric_rows(outcome)
    lines = [f"# Evaluation on the {main.split} split", ""]
    lines += [f"- {name}: {value:,}" for name, value in main.counts.items()]
    lines += [
        "- ranking: full catalog, the user's earlier positives removed; MRR within the top "
        f"{main.ks[-1]}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
    ]
    if isinstance(outcome, Comparison):
        lines += [
            f"delta = policy - reference, mean over users (per request for impression/ and "
            f"mcar/ metrics, an mcar/ request being one user's random test items; over logged "
            f"requests for ope/); CI: paired bootstrap, {outcome.ci:.0%}; "
            "* = the CI excludes 0.",
            "",
        ]
    if outcome.ope is not None:
        lines += [ope_note(outcome.ope), ""]
    lines += [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def plot_curves(outcome: Outcome, path: Path) -> None:
    """HR@K and NDCG@K of each model against K."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("hr", "ndcg"), strict=True):
        for role, result in _models(outcome).items():
            values = [result.aggregates[f"{metric}_at_{k}"] for k in result.ks]
            ax.plot(result.ks, values, marker="o", label=role)
        ax.set(xlabel="K", ylabel=f"{metric.upper()}@K", title=f"{metric.upper()}@K")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_kl(comparison: Comparison, path: Path) -> None:
    """Histogram of the per-user exact KL(policy || reference)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(comparison.per_user["kl"].to_numpy(), bins=50)
    ax.set(xlabel="KL(policy || reference) per user (nats)", ylabel="users",
           title="exact catalog KL")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_popularity(outcome: Outcome, item_counts: np.ndarray, path: Path) -> None:
    """Distribution of train popularity: catalog items vs each model's recommended items
    (weighted by how often each is recommended in the top max K)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    log_pop = np.log10(1 + np.asarray(item_counts, dtype=np.float64))
    bins = np.linspace(0, log_pop.max() + 1e-9, 30)
    ax.hist(log_pop[1:], bins=bins, density=True, histtype="step", lw=2, label="catalog")
    for role, result in _models(outcome).items():
        top = result.topk_items.reshape(-1)
        ax.hist(log_pop[top[top >= 0]], bins=bins, density=True, histtype="step", label=role)
    ax.set(xlabel="log10(1 + train positives of the item)", ylabel="density",
           title=f"popularity of top-{_main(outcome).ks[-1]} recommendations")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(
    out_dir: str | Path,
    outcome: Outcome,
    vocab: Vocab,
    item_counts: np.ndarray,
    config: dict[str, Any],
) -> Path:
    """Write the whole output directory atomically (manifest last); returns it."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        payload = metrics_payload(outcome, config)
        (tmp / "metrics.json").write_text(json.dumps(payload, indent=2, default=float))
        _with_user_ids(outcome.per_user, vocab).write_parquet(tmp / "per_user.parquet")
        topk_frame(_main(outcome), vocab).write_parquet(tmp / "topk.parquet")
        plots = ["curves.png", "popularity.png"]
        plot_curves(outcome, tmp / "curves.png")
        plot_popularity(outcome, item_counts, tmp / "popularity.png")
        if isinstance(outcome, Comparison):
            plot_kl(outcome, tmp / "kl.png")
            plots.append("kl.png")
        (tmp / "report.md").write_text(markdown(outcome, plots))
        write_manifest(tmp, {"stage": "evaluate", "split": payload["split"],
                             "config_hash": payload["config_hash"], **inputs(config)})  # fmt: skip
    return out_dir


def inputs(config: dict[str, Any]) -> dict[str, str | None]:
    """What was evaluated, for the manifest: the sha256 of the checkpoints and the prepared
    dataset's hash, so export can refuse an evaluation of another model or dataset."""
    ckpt, reference, prepared = (config.get(k) for k in ("ckpt", "reference_ckpt", "prepared"))
    return {
        "ckpt_sha256": file_sha256(Path(ckpt)) if ckpt else None,
        "reference_sha256": file_sha256(Path(reference)) if reference else None,
        "dataset_hash": content_hash(read_manifest(prepared)) if prepared else None,
    }
