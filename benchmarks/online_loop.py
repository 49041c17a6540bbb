"""The online loop on the synthetic simulator: offline / online DPO, their matched SFT, RLOO.

    python benchmarks/online_loop.py --out benchmarks/results/online_loop.json \
        [--tracking-uri sqlite:///mlflow.db]

For each seed s: the synthetic log of seed s (defaults: 2000 users x 500 items, ~160k
impressions), a reference trained on its clicks, then `recsys_dpo.online.loop.run_online`
for each serving rule and learning rate (fixed settings, none selected: there is no valid
split in the loop; every arm run is reported). Writes the JSON (every round of every run)
and a markdown table beside it: per arm and round, mean +- sd across seeds of the exact
truth/utility_at_10, truth/ctr_at_10, truth/expected_utility and kl/policy_ref, and the
paired across-seed differences to the reference, to offline DPO and (for each DPO method) to
its matched SFT control, with t 95% CIs (t_{0.975, n-1}). One core, about 3 minutes (20 s of it
per synthetic log).

With --tracking-uri, MLflow gets one parent run `online-loop` (experiment `online-loop`;
params: the settings common to every run, the seeds, serving rules and lrs) and one child run
per (seed, serve, lr) whose params are its OnlineSettings and whose metrics are each method's
read-out per round, `<method>/<name>` at step=round, and the reference's and oracle's figures
(`reference/<name>`, `oracle_utility`) at step 0.
"""

import argparse
import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.utils.validation import MAX_METRICS_PER_BATCH

from recsys_dpo.data.synthetic import SyntheticConfig, simulate
from recsys_dpo.online.loop import METHODS, OnlineSettings, run_online
from recsys_dpo.tracking.mlflow_utils import PARENT_TAG, open_tracking

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}
METRICS = ("truth/utility_at_10", "truth/ctr_at_10", "truth/expected_utility", "kl/policy_ref")
MATCHED_SFT = {"offline_dpo": "offline_sft", "online_dpo": "online_sft"}
EXPERIMENT = "online-loop"
VARIED = ("serve", "lr", "seed")


def _write(path: Path, text: str) -> None:
    """Atomic: a reader never sees half a results file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _mean_sd(values: list[float]) -> str:
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.4f}"


def _diff_ci(diffs: list[float]) -> str:
    mean = float(np.mean(diffs))
    if len(diffs) < 2:
        return f"{mean:+.4f}"
    half = T_975[len(diffs) - 1] * np.std(diffs, ddof=1) / np.sqrt(len(diffs))
    star = "*" if abs(mean) > half else ""
    return f"{mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}]{star}"


def _paired(rows: list[dict], baseline: list[dict]) -> str:
    """Δ truth/utility_at_10 of `rows` to `baseline`, paired by seed."""
    return _diff_ci([a["truth/utility_at_10"] - b["truth/utility_at_10"]
                     for a, b in zip(rows, baseline, strict=True)])  # fmt: skip


def markdown(runs: list[dict], seeds: list[int]) -> str:
    """Per arm (serve, lr) and round: mean ± sd over seeds, Δ utility vs the
    reference, vs offline DPO and vs the matched SFT."""
    lines = [
        "# Online loop on the synthetic simulator",
        "",
        f"Seeds {seeds} (each: its own synthetic log, reference and loop). Exact truth "
        "read-outs of each policy's top-10 over all users; Δ: paired across-seed difference "
        "of truth/utility_at_10 to the seed's reference, to offline DPO of the same arm "
        "and round, or (DPO methods) to the matched SFT control (online_sft: the same loop, "
        "users and exposures, CE on its own clicks; offline_sft: CE on offline DPO's log "
        "rows), t 95% CI over seeds, `*` where it excludes 0. Exposures: new simulated item "
        "exposures per round (online DPO and SFT: users x slate; RLOO: steps x users x k, "
        "equal by construction); the offline arms use none, trained on as many fixed-log "
        "pair rows as online DPO has collected.",
        "",
    ]
    first_arm = [r for r in runs if (r["serve"], r["lr"]) == (runs[0]["serve"], runs[0]["lr"])]
    ref_expected = [r["result"]["reference"]["truth/expected_utility"] for r in first_arm]
    reference = [r["result"]["reference"]["truth/utility_at_10"] for r in runs
                 if r["serve"] == runs[0]["serve"] and r["lr"] == runs[0]["lr"]]  # fmt: skip
    oracle = [r["result"]["oracle_utility"] for r in runs
              if r["serve"] == runs[0]["serve"] and r["lr"] == runs[0]["lr"]]  # fmt: skip
    lines += [f"Reference truth/utility_at_10: {_mean_sd(reference)}; oracle top-10: "
              f"{_mean_sd(oracle)}; reference truth/expected_utility: {_mean_sd(ref_expected)}.", ""]  # fmt: skip
    arms = sorted({(r["serve"], r["lr"]) for r in runs})
    for serve, lr in arms:
        arm = [r for r in runs if (r["serve"], r["lr"]) == (serve, lr)]
        lines += [
            f"## serve={serve}, lr={lr}",
            "",
            "| round | method | exposures/round | pair rows | truth/utility_at_10 | "
            "truth/ctr_at_10 | truth/expected_utility | kl/policy_ref | Δ utility vs reference | "
            "Δ utility vs offline DPO | Δ utility vs matched sft |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---|---|---|",
        ]
        rounds = sorted({row["round"] for row in arm[0]["result"]["rounds"]})
        for round_ in rounds:
            by_method = {m: [next(row for row in r["result"]["rounds"]
                                  if row["round"] == round_ and row["method"] == m)
                             for r in arm] for m in METHODS}  # fmt: skip
            for method in METHODS:
                rows = by_method[method]
                cells = [_mean_sd([row[m] for row in rows]) for m in METRICS]
                diff = "" if method == "offline_dpo" else _paired(rows, by_method["offline_dpo"])
                to_sft = (_paired(rows, by_method[MATCHED_SFT[method]])
                          if method in MATCHED_SFT else "")  # fmt: skip
                to_ref = _diff_ci([
                    row["truth/utility_at_10"] - r["result"]["reference"]["truth/utility_at_10"]
                    for row, r in zip(rows, arm, strict=True)
                ])  # fmt: skip
                lines.append(
                    f"| {round_} | {method} | {rows[0]['exposures']} | "
                    f"{round(np.mean([row['pair_rows'] for row in rows]))} | "
                    + " | ".join(cells)
                    + f" | {to_ref} | {diff} | {to_sft} |"
                )
        lines.append("")
    return "\n".join(lines)


def _params(values: dict) -> list[Param]:
    return [Param(name, str(value)) for name, value in values.items()]


def _metrics(result: dict) -> list[Metric]:
    """A run's figures: the reference's and the oracle's at step 0, every method's per round."""
    now = int(time.time() * 1000)
    metrics = [Metric(f"reference/{name}", value, now, 0)
               for name, value in result["reference"].items()]  # fmt: skip
    metrics.append(Metric("oracle_utility", result["oracle_utility"], now, 0))
    for row in result["rounds"]:
        metrics += [Metric(f"{row['method']}/{name}", float(value), now, row["round"])
                    for name, value in row.items() if name not in ("round", "method")]  # fmt: skip
    return metrics


def _log_child(
    client: MlflowClient, experiment_id: str, parent: str, settings: OnlineSettings, result: dict
) -> None:
    run_name = f"seed={settings.seed} serve={settings.serve} lr={settings.lr}"
    child = client.create_run(experiment_id, run_name=run_name, tags={PARENT_TAG: parent})
    run_id = child.info.run_id
    client.log_batch(run_id, params=_params(asdict(settings)))
    metrics = _metrics(result)
    for at in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[at : at + MAX_METRICS_PER_BATCH])
    client.set_terminated(run_id)


def run_benchmark(
    seeds: list[int],
    serves: list[str],
    lrs: list[float],
    base: OnlineSettings,
    simulator: SyntheticConfig | None = None,
    tracking_uri: str | None = None,
) -> dict:
    """Every (seed, serve, lr) run of the module docstring (the simulator of seed s:
    `simulator`, default SyntheticConfig(), with seed s); tracked in MLflow when
    `tracking_uri` is given. Returns the JSON payload."""
    simulator = simulator or SyntheticConfig()
    client: MlflowClient | None = None
    if tracking_uri is not None:
        client = open_tracking(tracking_uri, EXPERIMENT)
        experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
        parent = client.create_run(experiment_id, run_name="online-loop").info.run_id
        common = {name: value for name, value in asdict(base).items() if name not in VARIED}
        client.log_batch(parent, params=_params(
            {**common, "seeds": seeds, "serve": serves, "lr": lrs}))  # fmt: skip
    runs, start, status = [], time.perf_counter(), "FAILED"
    try:
        for seed in seeds:
            truth, events = simulate(replace(simulator, seed=seed))
            for serve in serves:
                for lr in lrs:
                    settings = replace(base, serve=serve, lr=lr, seed=seed)
                    t0 = time.perf_counter()
                    result = run_online(truth, events, settings)
                    runs.append({"seed": seed, "serve": serve, "lr": lr,
                                 "wall_s": time.perf_counter() - t0, "result": result})  # fmt: skip
                    print(f"seed={seed} serve={serve} lr={lr}: {runs[-1]['wall_s']:.1f} s",
                          flush=True)  # fmt: skip
                    if client is not None:
                        _log_child(client, experiment_id, parent, settings, result)
        status = "FINISHED"
    finally:
        if client is not None:
            client.set_terminated(parent, status=status)
    return {"benchmark": "online_loop", "seeds": seeds, "runs": runs,
            "wall_s": time.perf_counter() - start}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/online_loop.json"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--serve", nargs="+", default=["topk", "sample"])
    parser.add_argument("--lr", type=float, nargs="+", default=[3e-3, 3e-2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--users-per-round", type=int, default=1000)
    parser.add_argument("--rloo-steps", type=int, default=OnlineSettings.rloo_steps)
    parser.add_argument("--tracking-uri", default=None, help="MLflow store; default: none")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = OnlineSettings(
        rounds=args.rounds, users_per_round=args.users_per_round, rloo_steps=args.rloo_steps
    )
    payload = run_benchmark(args.seeds, args.serve, args.lr, base, tracking_uri=args.tracking_uri)
    _write(args.out, json.dumps(payload, indent=1) + "\n")
    _write(args.out.with_suffix(".md"), markdown(payload["runs"], args.seeds) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
