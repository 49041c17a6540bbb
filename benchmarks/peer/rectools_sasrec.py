"""The peer SASRec (RecTools 0.19 `SASRecModel`) on a prepared dataset of this project, so the
split is exactly ours (issue 11 point 4). Runs INSIDE the peer virtualenv
(benchmarks/peer/setup_venv.sh), never in the project's: RecTools pins numpy<2 and
pytorch-lightning<=2.5.2. `benchmarks/peer/compare.py` starts it and scores its lists with the
project's own metric code; it imports nothing of recsys_dpo.

    benchmarks/peer/.venv/bin/python benchmarks/peer/rectools_sasrec.py \
        --data artifacts/prepared/ml1m_sas --settings settings.json --out <dir>

Data, matching `recsys_dpo.evaluation.evaluator.build_queries`:
- fit on the train split's positives (`clicked`), each user's events in (timestamp, seq)
  order; ids are the project's own `user_idx` / `item_idx`, so the lists need no mapping;
- valid: the history is the train positives; test: train + valid positives. RecTools encodes
  each user's last `session_max_len` history items and, with `filter_viewed=True`, removes
  every history item from the ranking: the project's `eval.seen=remove`.
Ranking is over every item the model was fitted on (the train items: the project's vocabulary).

settings.json (written by compare.py from the project's study config): n_factors, n_blocks,
n_heads, dropout_rate, session_max_len, batch_size, lr, epochs, seed, gradient_clip_val, k.
Writes <out>/topk_valid.parquet and <out>/topk_test.parquet (user_idx, rank, item_idx) and
<out>/peer.json (versions, settings, the wall time of every training epoch).
"""

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import rectools
import torch
from rectools import Columns
from rectools.dataset import Dataset
from rectools.models import SASRecModel
from rectools.models.nn.item_net import IdEmbeddingsItemNet

# RecTools deep-copies the trainer it is given, callbacks included: the times go to a module
# list, not to the callback object the copy would hold.
EPOCH_SECONDS: list[float] = []


class EpochTimer(pl.Callback):
    """Wall seconds of each training epoch into EPOCH_SECONDS (no validation is configured,
    so training only)."""

    _start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        EPOCH_SECONDS.append(time.perf_counter() - self._start)


def positives(data: Path, splits: list[str]) -> pd.DataFrame:
    """RecTools interactions of the positives of `splits`, datetime = the (user, timestamp,
    seq) rank, so RecTools' stable sort by datetime keeps the project's event order."""
    frame = pd.concat([pd.read_parquet(data / f"{s}.parquet") for s in splits])
    frame = frame[frame["clicked"]].sort_values(["user_idx", "timestamp", "seq"], kind="stable")
    return pd.DataFrame(
        {
            Columns.User: frame["user_idx"].to_numpy(np.int64),
            Columns.Item: frame["item_idx"].to_numpy(np.int64),
            Columns.Weight: 1.0,
            Columns.Datetime: pd.to_datetime(np.arange(len(frame)), unit="s"),
        }
    )


def targets_users(data: Path, split: str) -> np.ndarray:
    """The users with a positive in `split` (the project's queries)."""
    frame = pd.read_parquet(data / f"{split}.parquet", columns=["user_idx", "clicked"])
    return np.unique(frame.loc[frame["clicked"], "user_idx"].to_numpy(np.int64))


def top_k(model: SASRecModel, history: pd.DataFrame, users: np.ndarray, k: int) -> pd.DataFrame:
    """user_idx, rank (0-based), item_idx: each user's top k, history items removed."""
    reco = model.recommend(
        users=users, dataset=Dataset.construct(history), k=k, filter_viewed=True,
        on_unsupported_targets="warn",
    )  # fmt: skip
    return pd.DataFrame(
        {
            "user_idx": reco[Columns.User].to_numpy(np.int64),
            "rank": reco[Columns.Rank].to_numpy(np.int64) - 1,
            "item_idx": reco[Columns.Item].to_numpy(np.int64),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a prepared dataset directory")
    parser.add_argument("--settings", type=Path, required=True, help="settings JSON")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    args = parser.parse_args()
    settings = json.loads(args.settings.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(settings["seed"], workers=True)

    def trainer() -> pl.Trainer:
        return pl.Trainer(
            max_epochs=settings["epochs"], min_epochs=settings["epochs"], accelerator="cpu",
            devices=1, gradient_clip_val=settings["gradient_clip_val"], callbacks=[EpochTimer()],
            enable_checkpointing=False, logger=False, enable_progress_bar=False,
            enable_model_summary=False,
        )  # fmt: skip

    model = SASRecModel(
        n_factors=settings["n_factors"],
        n_blocks=settings["n_blocks"],
        n_heads=settings["n_heads"],
        dropout_rate=settings["dropout_rate"],
        session_max_len=settings["session_max_len"],
        batch_size=settings["batch_size"],
        lr=settings["lr"],
        epochs=settings["epochs"],
        loss="softmax",  # the full-catalog softmax CE, as the project's `objective=ce`
        item_net_block_types=(IdEmbeddingsItemNet,),  # no features
        get_trainer_func=trainer,
        recommend_torch_device="cpu",
    )
    train = positives(args.data, ["train"])
    started = time.perf_counter()
    model.fit(Dataset.construct(train))
    fit_seconds = time.perf_counter() - started
    k = settings["k"]
    top_k(model, train, targets_users(args.data, "valid"), k).to_parquet(
        args.out / "topk_valid.parquet"
    )
    top_k(model, positives(args.data, ["train", "valid"]), targets_users(args.data, "test"),
          k).to_parquet(args.out / "topk_test.parquet")  # fmt: skip
    report = {
        "library": f"rectools {rectools.__version__}",
        "torch": torch.__version__,
        "pytorch_lightning": pl.__version__,
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "settings": settings,
        "train_sequences": int(train[Columns.User].nunique()),
        "epoch_seconds": EPOCH_SECONDS,
        "fit_seconds": fit_seconds,
    }
    (args.out / "peer.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
