"""Our SASRec against a peer implementation (RecTools 0.19 `SASRecModel`), same split, same
recipe, same epochs, one after the other in one run on the same box (issue 11 point 4).

    python benchmarks/peer/compare.py --data artifacts/prepared/ml1m_sas --epochs 3 \
        [--peer-python benchmarks/peer/.venv/bin/python] [--threads 1] [--full-budget]

- The recipe is the ML-1M study's reference (`recsys_dpo/conf/study/ml1m_sasrec.yaml`: the
  `model:` and `train:` blocks and `study.reference`), composed by hydra exactly as
  `pipelines/study.py` composes it, except: `--epochs` fixed epochs for both and no early
  stopping (RecTools has no valid-NDCG early stopping), and both models are read at their LAST
  epoch.
- Ours: `recsys_dpo.training.run.train_reference` on that config, in this process. Its epoch
  time is the gap between consecutive epochs' `val/ndcg_at_10` in MLflow (training plus the
  built-in full-catalog validation pass); the validation pass is timed on its own over the
  same loader and subtracted, so `train_epoch_s` of both sides is training only.
- Peer: `benchmarks/peer/rectools_sasrec.py` in its own virtualenv (`setup_venv.sh`), on the
  same prepared parquet files; a Lightning callback times its training epochs.
- Metrics: both sides' top-10 lists (full catalog, every history item removed, as
  `eval.seen=remove`) are scored by the same code, `recsys_dpo.evaluation.metrics`, on the
  queries of `recsys_dpo.evaluation.evaluator.build_queries`; the peer minus ours per user with
  a paired bootstrap CI. Ours is also reported as our evaluator computes it (pessimistic ties).
- The machine is shared: `os.getloadavg()` is recorded before, between and after.

Writes benchmarks/results/peer_sasrec_ml1m.json (or --out).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from recsys_dpo.data.datamodule import SequenceDataModule, load_prepared
from recsys_dpo.evaluation import metrics
from recsys_dpo.evaluation.evaluator import build_queries, evaluate
from recsys_dpo.pipeline import stage_config
from recsys_dpo.study.runner import template_of
from recsys_dpo.study.spec import study_spec
from recsys_dpo.training.ranking_eval import ranking_metrics
from recsys_dpo.training.reference_module import load_model, read_checkpoint
from recsys_dpo.training.run import train_reference

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
RESULTS = ROOT / "benchmarks" / "results" / "peer_sasrec_ml1m.json"
STUDY = "ml1m_sasrec"
K = 10
METRICS = (f"ndcg_at_{K}", f"hr_at_{K}")


def load() -> dict[str, Any]:
    """The 1/5/15-minute load averages, with the UTC time they were read."""
    return {"utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "loadavg": [round(x, 2) for x in os.getloadavg()]}  # fmt: skip


def reference_config(data: Path, work: Path, epochs: int, seed: int) -> tuple[Any, int]:
    """The study's reference stage config (as `Study.reference` builds it) at fixed epochs,
    and the study's own max_epochs."""
    with initialize_config_dir(str(ROOT / "recsys_dpo" / "conf"), version_base="1.3"):
        cfg = compose("run_study", [
            f"study={STUDY}", f"paths.artifacts={work}", f"paths.prepared={data}",
            f"tracking.uri=sqlite:///{work}/mlflow.db", "progress=false",
        ])  # fmt: skip
    spec = study_spec(cfg.study, list(cfg.eval.k))
    recipe = spec.reference
    updates = {**recipe.updates(), "trainer.max_epochs": epochs,
               "train.early_stopping_patience": None}  # fmt: skip
    stage = stage_config(template_of(cfg), objective=dict(spec.objectives[recipe.objective]),
                         mode="fresh", seed=seed, **updates)  # fmt: skip
    return stage, recipe.max_epochs


def peer_settings(cfg: Any, epochs: int, seed: int) -> dict[str, Any]:
    """The same recipe in RecTools' SASRecModel argument names."""
    return {
        "n_factors": cfg.model.dim, "n_blocks": cfg.model.n_layers, "n_heads": cfg.model.n_heads,
        "dropout_rate": cfg.model.dropout, "session_max_len": cfg.data.max_len,
        "batch_size": cfg.train.batch_size, "lr": cfg.train.lr, "epochs": epochs, "seed": seed,
        "gradient_clip_val": cfg.trainer.gradient_clip_val, "k": K,
    }  # fmt: skip


def validation_pass_seconds(cfg: Any, ckpt: str) -> float:
    """Wall time of one built-in validation pass (the ranking metrics over the valid loader)."""
    data = SequenceDataModule(
        cfg.paths.prepared,
        max_len=cfg.data.max_len,
        batch_size=cfg.train.batch_size,
        seed=cfg.seed,
        seen=cfg.eval.seen,
    )
    data.setup("validate")
    model = load_model(ckpt)
    started = time.perf_counter()
    with torch.no_grad():
        for batch in data.val_dataloader():
            ranking_metrics(model, batch, K)
    return time.perf_counter() - started


def epoch_gaps(tracking_uri: str, run_id: str) -> list[float]:
    """Seconds between consecutive epochs' val/ndcg_at_10 logs (epoch 1 onwards)."""
    history = MlflowClient(tracking_uri).get_metric_history(run_id, f"val/ndcg_at_{K}")
    stamps = sorted(m.timestamp for m in history)
    return [(b - a) / 1000 for a, b in zip(stamps, stamps[1:], strict=False)]


def lists_from_parquet(path: Path, users: np.ndarray) -> np.ndarray:
    """[U, K] item_idx of the peer's top-K (rank order) for `users`; -1 where it gave none."""
    frame = pl.read_parquet(path)
    out = np.full((len(users), K), -1, dtype=np.int64)
    row = {int(u): i for i, u in enumerate(users)}
    rows = np.array([row.get(int(u), -1) for u in frame["user_idx"].to_numpy()])
    keep = (rows >= 0) & (frame["rank"].to_numpy() < K)
    out[rows[keep], frame["rank"].to_numpy()[keep]] = frame["item_idx"].to_numpy()[keep]
    return out


def scored(ranked: np.ndarray, targets: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Per-user NDCG@K and HR@K of top-K lists, by the project's metric functions."""
    return {METRICS[0]: metrics.ndcg_at_k(ranked, targets, K),
            METRICS[1]: metrics.hit_rate_at_k(ranked, targets, K)}  # fmt: skip


def means(per_user: dict[str, np.ndarray]) -> dict[str, float]:
    return {name: round(metrics.user_mean(v)[0], 4) for name, v in per_user.items()}


def run_ours(cfg: Any, data: Any, queries: dict[str, Any]) -> tuple[dict, dict]:
    """Train and score ours; (report, per-user metrics by split)."""
    started = time.perf_counter()
    out = train_reference(cfg)
    fit_s = time.perf_counter() - started
    result = json.loads((out / "result.json").read_text())
    ckpt = result["last_ckpt"]
    gaps = epoch_gaps(cfg.tracking.uri, result["mlflow_run_id"])
    valid_pass = validation_pass_seconds(cfg, ckpt)
    model = load_model(ckpt)
    report: dict[str, Any] = {"implementation": "recsys_dpo SASRec (recsys_dpo/models/sasrec.py)",
                              "ckpt": ckpt, "fit_s": round(fit_s, 1)}  # fmt: skip
    per_user = {}
    for split, q in queries.items():
        result_split = evaluate(model, data, split, k=[K], queries=q)
        per_user[split] = scored(result_split.topk_items, q.targets)
        report[split] = means(per_user[split]) | {
            f"evaluator_{m}": round(result_split.aggregates[m], 4) for m in METRICS
        }
    steps = int(read_checkpoint(ckpt)["global_step"])
    report |= {
        "steps_per_epoch": steps // cfg.trainer.max_epochs,
        "epoch_with_valid_s": [round(g, 1) for g in gaps],
        "valid_pass_s": round(valid_pass, 1),
        "train_epoch_s": round(statistics.median(gaps) - valid_pass, 1) if gaps else None,
    }
    return report, per_user


def run_peer(python: str, cfg: Any, settings: dict, threads: int, work: Path,
             queries: dict[str, Any]) -> tuple[dict, dict]:  # fmt: skip
    """Train the peer in its own venv and score its lists; (report, per-user metrics)."""
    out = work / "peer"
    (work / "peer_settings.json").write_text(json.dumps(settings))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    subprocess.run([python, str(HERE / "rectools_sasrec.py"), "--data", str(cfg.paths.prepared),
                    "--settings", str(work / "peer_settings.json"), "--out", str(out)],
                   check=True, env=env)  # fmt: skip
    wall = time.perf_counter() - started
    report = json.loads((out / "peer.json").read_text())
    epochs = report.pop("epoch_seconds")
    report |= {"process_s": round(wall, 1), "epoch_s": [round(e, 1) for e in epochs],
               "train_epoch_s": round(statistics.median(epochs), 1),
               "steps_per_epoch": -(-report["train_sequences"] // settings["batch_size"])}  # fmt: skip
    per_user = {}
    for split, q in queries.items():
        ranked = lists_from_parquet(out / f"topk_{split}.parquet", q.user_idx)
        per_user[split] = scored(ranked, q.targets)
        report[split] = means(per_user[split]) | {
            "users_without_list": int((ranked[:, 0] < 0).sum())
        }
    return report, per_user


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="prepared ml1m_sas directory")
    parser.add_argument("--epochs", type=int, required=True, help="epochs, both models")
    parser.add_argument(
        "--full-budget",
        action="store_true",
        help="say the epochs are the study reference's full budget",
    )
    parser.add_argument("--peer-python", default=str(HERE / ".venv" / "bin" / "python"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="scratch dir (default: temp)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = (args.work or Path(tempfile.mkdtemp(prefix="peer_sasrec_"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cfg, study_epochs = reference_config(args.data.resolve(), work, args.epochs, args.seed)
    data = load_prepared(cfg.paths.prepared)
    queries = {split: build_queries(data, split, cfg.eval.seen) for split in ("valid", "test")}
    settings = peer_settings(cfg, args.epochs, args.seed)
    loads = {"before": load()}
    ours, ours_users = run_ours(cfg, data, queries)
    loads["between"] = load()
    peer, peer_users = run_peer(args.peer_python, cfg, settings, args.threads, work, queries)
    loads["after"] = load()
    deltas = {}
    for m in METRICS:
        mean, lo, hi = metrics.paired_bootstrap_ci(ours_users["test"][m], peer_users["test"][m],
                                                   1000, args.seed)  # fmt: skip
        deltas[m] = {"mean": round(mean, 4), "lo": round(lo, 4), "hi": round(hi, 4)}
    report = {
        "what": "SASRec on ML-1M leave-one-out: recsys_dpo vs RecTools, same split and recipe",
        "budget": {
            "epochs": args.epochs,
            "kind": "full"
            if args.full_budget
            else "REDUCED: a preliminary figure, not the "
            "study's baseline (the study's reference trains up to "
            f"{study_epochs} epochs with early stopping on valid NDCG@10)",
            "read_at": "the last epoch, both models (no early stopping)",
        },
        "recipe": settings
        | {
            "loss": "full-catalog softmax CE",
            "optimizer": {
                "ours": "AdamW(betas 0.9, 0.999), weight_decay 0",
                "peer": "Adam(betas 0.9, 0.98) (RecTools' fixed default)",
            },
            "train_examples": {
                "ours": "every train target: each user's sequence cut into 200-target windows",
                "peer": "each user's latest 201 train items (RecTools' SASRec data preparator)",
            },
        },
        "protocol": "full catalog, every history item removed (eval.seen=remove); valid history "
        "= train, test history = train + valid; top-10 lists of both scored by "
        "recsys_dpo.evaluation.metrics; ours also by its evaluator (pessimistic ties)",
        "machine": {
            "cpus": os.cpu_count(),
            "threads_each": args.threads,
            "python": platform.python_version(),
            "load_1_5_15_min": loads,
        },
        "ours": ours,
        "peer": peer,
        "test_delta_peer_minus_ours": deltas | {"ci": "95% paired bootstrap over users, 1000"},
        "train_epoch_ratio_peer_over_ours": round(peer["train_epoch_s"] / ours["train_epoch_s"], 2)
        if ours.get("train_epoch_s")
        else None,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
