"""The study's output: study.json and table.md in the study's output directory.

Every entry (baseline, references, each row at its selected point, its matched controls) has
valid and test figures, mean +- sd across references (each reference's figure the mean over its
fine-tuning seeds). Differences are paired per user on test: the CI shown is the two-level
bootstrap over references and users (`stats.hierarchical_bootstrap_ci`); the per-reference
paired bootstrap over users (`metrics.paired_bootstrap_ci`) is listed below the main table and
in the JSON. The table says which figures were used for selection (valid, rows only) and which
are the test read-out. A global metric (`spec.GLOBAL_METRICS`: coat_paper/auc pools every
(user, item) row, so no user has a value of their own) gets no per-user CI: its difference is
each reference's difference of the global figure, shown as mean +- sd across references.

The frontier (`frontier_point`): every row's every grid point on valid (with reward models
also the RLHF optimum itself at each beta, row `pi* (closed form)`), x the mean exact
KL(pi || pi_ref) over valid users (`evaluator.policy_kl`), y each metric; study.json's
`frontier`, a table in table.md and frontier.png (one curve per row, one panel per metric;
matplotlib's Agg backend, files only). Valid only: test stays read once, after selection.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np

from recsys_dpo.artifacts import atomic_dir
from recsys_dpo.data.schema import USER_IDX
from recsys_dpo.evaluation.metrics import paired_bootstrap_ci
from recsys_dpo.study.spec import GLOBAL_METRICS, SELECTION_SPLIT, StudySpec
from recsys_dpo.study.stats import hierarchical_bootstrap_ci, mean_sd

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

if TYPE_CHECKING:
    from recsys_dpo.study.runner import Entry, Grid2, Ledger

# The bootstrap's seed: fixed, so the same evaluations always give the same CIs.
BOOTSTRAP_SEED = 0
CI_SHOWN = ("two-level (hierarchical) bootstrap: references resampled with replacement, then "
            "users within each drawn reference, of the paired per-user test difference")  # fmt: skip


def per_user(evals: Grid2, metric: str) -> np.ndarray:
    """Values [R, U]: per reference, the mean over its seeds of each user's metric. Every
    evaluation of one split covers the same users in the same order (checked)."""
    users = evals[0][0].per_user[USER_IDX].to_numpy()
    rows = []
    for seeds in evals:
        for e in seeds:
            if not np.array_equal(e.per_user[USER_IDX].to_numpy(), users):
                raise RuntimeError(f"{e.model}: its {e.split} users differ from the others'")
        rows.append(np.mean([e.per_user[metric].to_numpy() for e in seeds], axis=0))
    return np.stack(rows)


def figures(evals: Grid2, metric: str) -> dict[str, Any]:
    """mean, sd and the per-reference values of an aggregate metric."""
    per_ref = [float(np.mean([e.aggregates[metric] for e in seeds])) for seeds in evals]
    mean, sd = mean_sd(per_ref)
    return {"mean": mean, "sd": sd, "per_reference": per_ref}


def delta(entry: Entry, other: Entry, metric: str, n_resamples: int, ci: float) -> dict[str, Any]:
    """entry - other on test, paired per user: mean, sd across references, the two-level CI
    (lo, hi) and each reference's paired bootstrap CI. Users without a value (an `mcar/`
    metric of a user whose random items are all relevant or all not) are left out; which
    users those are depends on the data, not the model, so both sides lose the same ones.
    A global metric: each reference's difference of the figures, no CI (lo, hi None)."""
    if metric in GLOBAL_METRICS:
        diffs = [b - a for a, b in zip(figures(other.test, metric)["per_reference"],
                                       figures(entry.test, metric)["per_reference"], strict=True)]  # fmt: skip
        mean, sd = mean_sd(diffs)
        return {"mean": mean, "sd": sd, "lo": None, "hi": None, "global": True,
                "per_reference": [{"mean": d, "lo": None, "hi": None} for d in diffs]}  # fmt: skip
    a, b = per_user(other.test, metric), per_user(entry.test, metric)
    defined = ~(np.isnan(a).any(axis=0) | np.isnan(b).any(axis=0))
    a, b = a[:, defined], b[:, defined]
    alpha = 1 - ci
    mean, lo, hi = hierarchical_bootstrap_ci(b - a, n_resamples, BOOTSTRAP_SEED, alpha)
    per_ref = [
        dict(zip(("mean", "lo", "hi"),
                 paired_bootstrap_ci(a[r], b[r], n_resamples, BOOTSTRAP_SEED, alpha), strict=True))
        for r in range(len(a))
    ]  # fmt: skip
    sd = mean_sd([p["mean"] for p in per_ref])[1]
    return {"mean": mean, "sd": sd, "lo": lo, "hi": hi, "per_reference": per_ref}


def entry_json(entry: Entry, spec: StudySpec) -> dict[str, Any]:
    metrics = list(dict.fromkeys([spec.selection_metric, *spec.metrics]))
    return {
        "name": entry.name, "kind": entry.kind, "of": entry.of, "selected": entry.selected,
        "grid": entry.grid, "runs": entry.runs, "epochs": entry.epochs, "steps": entry.steps,
        "cost": cost_summary(entry.costs),
        "valid": {m: figures(entry.valid, m) for m in metrics},
        "test": {m: figures(entry.test, m) for m in metrics},
        "deltas": {f"vs {what}": {"vs": other.name, **{m: delta(entry, other, m, spec.n_resamples,
                                                                spec.ci) for m in metrics}}
                   for what, other in entry.compare_with.items()},
    }  # fmt: skip


def cost_summary(costs: list[list[dict[str, Any] | None]] | None) -> dict[str, Any] | None:
    """What an entry's training runs cost (`training.run.fit_cost`, over every reference and
    seed): wall seconds and optimizer steps as mean ± sd, the largest peak RSS; None when a run
    has no record (the baseline; a run cached from before costs were recorded)."""
    runs = [c for s in costs or [] for c in s]
    if not runs or None in runs:
        return None
    out = {k: dict(zip(("mean", "sd"), mean_sd([float(c[k]) for c in runs]), strict=True))
           for k in ("fit_seconds", "optimizer_steps")}  # fmt: skip
    rss = [c["peak_rss_mb"] for c in runs if c.get("peak_rss_mb") is not None]
    gpu = [c["peak_gpu_mb"] for c in runs if c.get("peak_gpu_mb") is not None]
    return {**out, "peak_rss_mb": max(rss, default=None), "peak_gpu_mb": max(gpu, default=None),
            "runs": len(runs)}  # fmt: skip


COST_CAPTION = ("Training cost at the selected points (`trainer.fit` only: data loading and "
                "negative mining before it are not counted), over every reference x seed: wall "
                "seconds and optimizer steps mean ± sd, the largest peak RSS of the training "
                "process (MiB). With study.jobs > 1 the runs shared the machine's cores, so "
                "compare rows of one study, not studies.")  # fmt: skip


def cost_markdown(rows: list[dict[str, Any]], reward: dict[str, Any] | None) -> list[str]:
    """The cost table (COST_CAPTION): every entry with a record, then the reward models."""
    def line(name: str, c: dict[str, Any]) -> str:
        gpu = "" if c["peak_gpu_mb"] is None else f" (GPU {c['peak_gpu_mb']:.0f})"
        rss = "n/a" if c["peak_rss_mb"] is None else f"{c['peak_rss_mb']:.0f}{gpu}"
        return (f"| {name} | {c['fit_seconds']['mean']:.1f} ± {c['fit_seconds']['sd']:.1f} | "
                f"{c['optimizer_steps']['mean']:.0f} | {rss} |")

    lines = [line(r["name"], r["cost"]) for r in rows if r.get("cost")]
    if reward is not None:
        lines.append(line("reward model (once per reference; the RLHF rows' extra cost)", reward))
    if not lines:
        return []
    return ["## Cost", "", COST_CAPTION, "", "| entry | fit s | optimizer steps | peak RSS MiB |",
            "|---|---:|---:|---:|", *lines, ""]  # fmt: skip


def frontier_point(row: str, point: dict[str, Any], kls: list[list[dict[str, float]]],
                   evals: Grid2, metrics: list[str], selected: bool) -> dict[str, Any]:  # fmt: skip
    """One point of the frontier: `kls` [reference][seed] the runs' `kl` (mean exact KL to
    their own reference on valid) and, with reward models, `reward_gain`; `evals` the same
    runs' valid evaluations; mean +- sd across references (each the mean over its seeds)."""

    def across(key: str) -> dict[str, Any]:
        per_ref = [float(np.mean([k[key] for k in s])) for s in kls]
        mean, sd = mean_sd(per_ref)
        return {"mean": mean, "sd": sd, "per_reference": per_ref}

    out = {"row": row, "point": point, "selected": selected, "kl": across("kl"),
           "valid": {m: figures(evals, m) for m in metrics}}  # fmt: skip
    for key in ("reward_gain", "kl_to_optimum"):
        if key in kls[0][0]:
            out[key] = across(key)
    return out


FRONTIER_CAPTION = ("x: mean exact KL(pi || pi_ref) over valid users, each run to its own "
                    "reference; y: the valid metric; mean ± sd across references. Valid only: "
                    "test is read once, for the selected recipes (main table).")  # fmt: skip


def frontier_markdown(frontier: list[dict[str, Any]], metrics: list[str]) -> list[str]:
    """The frontier as a table (FRONTIER_CAPTION)."""
    gain = "reward_gain" in frontier[0]
    optimum = any("kl_to_optimum" in p for p in frontier)
    cols = [*metrics, *(["reward gain E_pi[r] - E_ref[r]"] if gain else []),
            *(["KL(pi*_beta ‖ pi)"] if optimum else [])]  # fmt: skip

    def cells(p: dict[str, Any]) -> list[str]:
        return [*(_fig(p["valid"][m]) for m in metrics),
                *([_fig(p["reward_gain"])] if gain else []),
                *([_fig(p["kl_to_optimum"]) if "kl_to_optimum" in p else ""] if optimum else [])]  # fmt: skip

    return ["## Reward-KL frontier (valid)", "", FRONTIER_CAPTION
            + (" Reward gain: under the reference's own reward model, every row." if gain else "")
            + (" KL(pi*_beta ‖ pi): to the RLHF optimum pi_ref exp(r / beta) / Z of that reward"
               " model at the row's own beta; row pi* (closed form): that optimum itself, served"
               " as s_ref + r / beta, nothing trained." if optimum else ""),
            "", "| row | point | selected | KL(pi ‖ pi_ref) | " + " | ".join(cols) + " |",
            "|---|---|---|---:|" + "---:|" * len(cols),
            *(f"| {p['row']} | {_point(p['point'])} | {'yes' if p['selected'] else ''} | "
              f"{_fig(p['kl'])} | " + " | ".join(cells(p)) + " |" for p in frontier), ""]  # fmt: skip


def plot_frontier(frontier: list[dict[str, Any]], metrics: list[str], title: str,
                  path: Path) -> None:  # fmt: skip
    """frontier.png: one panel per metric (and the reward gain, when there is one), one curve
    per row in grid order (error bars: sd across references), the reference a star at KL 0,
    the selected point ringed."""
    panels = [*metrics, *(["reward_gain"] if "reward_gain" in frontier[0] else [])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    rows = list(dict.fromkeys(p["row"] for p in frontier))

    def fig_of(p: dict[str, Any], m: str) -> dict[str, Any]:
        return p["reward_gain"] if m == "reward_gain" else p["valid"][m]

    for ax, m in zip(axes[0], panels, strict=True):
        for row in rows:
            pts = [p for p in frontier if p["row"] == row]
            x = [p["kl"]["mean"] for p in pts]
            y = [fig_of(p, m)["mean"] for p in pts]
            err = [fig_of(p, m)["sd"] for p in pts]
            if row == "reference":
                ax.plot(x, y, "k*", markersize=12, label=row)
                continue
            line = ax.errorbar(x, y, yerr=err, marker="o", capsize=2, label=row)[0]
            chosen = [i for i, p in enumerate(pts) if p["selected"]]
            ax.scatter([x[i] for i in chosen], [y[i] for i in chosen], s=150, facecolors="none",
                       edgecolors=line.get_color())  # fmt: skip
        ax.set_xlabel("exact KL(π ‖ π_ref), valid")
        ax.set_ylabel("valid E_π[r] − E_ref[r] (reward model)" if m == "reward_gain"
                      else f"valid {m}")  # fmt: skip
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{title}: reward-KL frontier on valid (test read once, after selection)",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fig(f: dict[str, Any]) -> str:
    return f"{f['mean']:.4f} ± {f['sd']:.4f}"


def _ci(d: dict[str, Any] | None) -> str:
    if d is None:
        return ""
    if d["lo"] is None:  # a global metric: no per-user CI
        return f"{d['mean']:+.4f} (global, no CI)"
    mark = "*" if d["lo"] > 0 or d["hi"] < 0 else ""
    return f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]{mark}"


def _point(point: dict[str, Any] | None) -> str:
    return "" if not point else ", ".join(f"{k}={v}" for k, v in point.items())


def _epochs(entry: dict[str, Any]) -> str:
    """'(fixed)', with the best valid epoch of each reference for the references."""
    best = [e.get("best_epoch") for s in entry["epochs"] or [] for e in s]
    if entry["kind"] != "reference" or None in best:
        return "(fixed)"
    return f"(fixed; best valid epoch {'/'.join(map(str, best))})"


def markdown(result: dict[str, Any], spec: StudySpec) -> str:
    """table.md: the main table, the selection grids, the per-reference CIs, the cache."""
    m, sel = spec.metrics[0], spec.selection_metric
    n_refs, n_seeds = len(spec.reference_seeds), len(spec.seeds)
    level = f"{spec.ci:.0%}"
    out = [
        f"# Study {spec.name}", "",
        f"Selection: each row's hyperparameters were chosen on **{SELECTION_SPLIT} {sel}** only "
        f"(best mean over {n_refs} references x {n_seeds} fine-tuning seed(s)); **test** was "
        "read once, for the selected recipe, its matched controls, the references and the "
        "baseline. Column `valid` of a row is the figure it was selected by; `test` columns "
        "are the read-out. Figures: mean ± sd across references.", "",
        f"CI shown ({level}): {CI_SHOWN}; `*` where it excludes 0. The per-reference paired "
        "bootstrap CIs over users follow the main table.", "",
        f"| entry | selected on valid | valid {sel} | test {sel} | "
        + " | ".join(f"test {x}" for x in spec.metrics if x != sel)
        + f" | Δ test {m} vs reference | Δ vs sft | Δ vs continue |"
        + "".join(f" Δ vs `{v}` |" for v in spec.versus),
        "|---|---|---:|---:|" + "---:|" * len([x for x in spec.metrics if x != sel])
        + "---|---|---|" + "---|" * len(spec.versus),
    ]  # fmt: skip
    for e in result["rows"]:
        d = e["deltas"]
        cells = [e["name"], _point(e["selected"]) if e["kind"] == "row" else _epochs(e),
                 _fig(e["valid"][sel]), _fig(e["test"][sel]),
                 *(_fig(e["test"][x]) for x in spec.metrics if x != sel),
                 *(_ci(d.get(f"vs {w}", {}).get(m))
                   for w in ("reference", "sft", "continue", *(f"row {v}" for v in spec.versus)))]  # fmt: skip
        out.append("| " + " | ".join(cells) + " |")
    out += [
        "",
        f"## Selection grids ({SELECTION_SPLIT} {sel}, mean ± sd over references x seeds)",
        "",
    ]
    for e in result["rows"]:
        if e["kind"] != "row":
            continue
        out += [f"### {e['name']}", "", "| point | valid | selected |", "|---|---:|---|"]
        out += [f"| {_point(g['point']) or '(no grid)'} | {_fig(g['valid'])} | "
                f"{'yes' if g['selected'] else ''} |" for g in e["grid"]]  # fmt: skip
        out.append("")
    out += [f"## Per-reference paired bootstrap CIs (test {m}, {level})", "",
            "| entry | vs | " + " | ".join(f"reference {i + 1}" for i in range(n_refs)) + " |",
            "|---|---|" + "---|" * n_refs]  # fmt: skip
    for e in result["rows"]:
        for what, d in e["deltas"].items():
            out.append(f"| {e['name']} | {what.removeprefix('vs ')} ({d['vs']}) | "
                       + " | ".join(_ci(p) for p in d[m]["per_reference"]) + " |")  # fmt: skip
    cache = result["cache"]
    out += ["", f"Cache: {len(cache['trained'])} run(s) trained, {len(cache['reused'])} reused; "
            f"{len(cache['evaluated'])} evaluation(s) computed, {len(cache['eval_reused'])} "
            "reused."]  # fmt: skip
    return "\n".join(out) + "\n"


def write_report(spec: StudySpec, lines: list[Entry], ledger: Ledger, test_reads: list[str],
                 frontier: list[dict[str, Any]],
                 reward_costs: list[dict[str, Any] | None] | None = None) -> Path:  # fmt: skip
    """study.json, table.md and frontier.png into spec.out_dir (atomically), study.json (and
    frontier.png beside it, same stem) also to spec.publish when set; the output directory.
    `reward_costs`: each reference's reward-model run's cost, in a study with RLHF rows."""
    result = {
        "study": spec.name,
        "selection": {"split": SELECTION_SPLIT, "metric": spec.selection_metric,
                      "rule": "best mean valid metric across references and seeds, per row"},
        "ci": {"level": spec.ci, "shown": CI_SHOWN, "n_resamples": spec.n_resamples,
               "per_reference": "paired bootstrap over users (deltas.*.<metric>.per_reference)"},
        "reference_seeds": list(spec.reference_seeds), "seeds": list(spec.seeds),
        "rows": [entry_json(e, spec) for e in lines],
        "cache": {"trained": ledger.trained, "reused": ledger.reused,
                  "evaluated": ledger.evaluated, "eval_reused": ledger.eval_reused},
        "test_reads": test_reads,
        "frontier": frontier,
        "reward_cost": None if reward_costs is None else cost_summary([reward_costs]),
    }  # fmt: skip
    metrics = list(dict.fromkeys((spec.selection_metric, *spec.metrics)))
    text = json.dumps(result, indent=2)
    table = "\n".join([markdown(result, spec), *frontier_markdown(frontier, metrics),
                       *cost_markdown(result["rows"], result["reward_cost"])])
    with atomic_dir(spec.out_dir) as tmp:
        (tmp / "study.json").write_text(text)
        (tmp / "table.md").write_text(table)
        plot_frontier(frontier, metrics, spec.name, tmp / "frontier.png")
    if spec.publish is not None:
        spec.publish.parent.mkdir(parents=True, exist_ok=True)
        for src, dst in ((None, spec.publish), (spec.out_dir / "frontier.png",
                                                 spec.publish.with_suffix(".png"))):  # fmt: skip
            tmp_file = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
            tmp_file.write_bytes(text.encode() if src is None else src.read_bytes())
            os.replace(tmp_file, dst)
    return spec.out_dir
