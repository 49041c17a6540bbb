"""DataModules, the reference and preference LightningModules, on tiny hand-made datasets."""

import math
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from recsys_dpo.artifacts import write_manifest
from recsys_dpo.data.datamodule import PairDataModule, SequenceDataModule, load_prepared
from recsys_dpo.errors import DataError
from recsys_dpo.training.callbacks import StepSeed
from recsys_dpo.training.preference_module import PreferenceModule
from recsys_dpo.training.ranking_eval import hit_and_ndcg, mask_seen, target_rank
from recsys_dpo.training.reference_module import ReferenceModule, load_model

N_REAL = 30  # real items 1..30; index 0 is padding
N_USERS = 48
TRAIN_LEN = 6
SASREC = {"dim": 16, "n_layers": 1, "n_heads": 1, "max_len": 8, "dropout": 0.2}


def cyclic(user: int, length: int) -> list[int]:
    """User u's positives: a run of consecutive items (mod N_REAL) starting at u."""
    return [(user + j) % N_REAL + 1 for j in range(length)]


def events_frame(rows: list[tuple[int, int, int]], split: str) -> pl.DataFrame:
    users, items, times = zip(*rows, strict=True)
    return pl.DataFrame(
        {
            "user_idx": pl.Series(users, dtype=pl.Int32),
            "item_idx": pl.Series(items, dtype=pl.Int32),
            "timestamp": pl.Series(times, dtype=pl.Int64),
            "clicked": [True] * len(rows),
            "seq": pl.Series(range(len(rows)), dtype=pl.Int64),
            "split": [split] * len(rows),
        }
    )


def pairs_frame(users: range, rng: np.random.Generator) -> pl.DataFrame:
    """Per user: the train run's last item chosen after its prefix, 1-3 random rejected."""
    rows = []
    for u in users:
        seq = cyclic(u, TRAIN_LEN)
        others = [i for i in range(1, N_REAL + 1) if i not in seq]
        k = 1 + u % 3
        rows.append((u, seq[:-1], seq[-1], rng.choice(others, k, replace=False).tolist()))
    u, ctx, ch, rej = zip(*rows, strict=True)
    return pl.DataFrame(
        {"user_idx": u, "context": ctx, "chosen": ch, "rejected": rej,
         "weight": [1.0] * len(rows), "source": ["next_item"] * len(rows),
         "timestamp": [TRAIN_LEN] * len(rows), "seq": list(u)},
        schema={"user_idx": pl.Int32, "context": pl.List(pl.Int32), "chosen": pl.Int32,
                "rejected": pl.List(pl.Int32), "weight": pl.Float32, "source": pl.Utf8,
                "timestamp": pl.Int64, "seq": pl.Int64},
    )  # fmt: skip


def write_prepared(root: Path, n_users: int = N_USERS) -> Path:
    """A prepared dataset: each user's run of TRAIN_LEN items, then the next item as valid."""
    root.mkdir(parents=True, exist_ok=True)
    train = [(u, i, t) for u in range(n_users) for t, i in enumerate(cyclic(u, TRAIN_LEN))]
    valid = [(u, cyclic(u, TRAIN_LEN + 1)[-1], TRAIN_LEN) for u in range(n_users)]
    test = [(u, cyclic(u, TRAIN_LEN + 2)[-1], TRAIN_LEN + 1) for u in range(n_users)]
    for split, rows in (("train", train), ("valid", valid), ("test", test)):
        events_frame(rows, split).write_parquet(root / f"{split}.parquet")
    rng = np.random.default_rng(0)
    pairs_frame(range(n_users), rng).write_parquet(root / "pairs_train.parquet")
    pairs_frame(range(0, n_users, 4), rng).write_parquet(root / "pairs_valid.parquet")
    pl.DataFrame({"item_id": [str(i) for i in range(1, N_REAL + 1)],
                  "item_idx": pl.Series(range(1, N_REAL + 1), dtype=pl.Int32)}).write_parquet(
        root / "vocab_items.parquet")  # fmt: skip
    write_manifest(root, {"n_items": N_REAL + 1, "n_users": n_users, "config": {}})
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("prepared"))


def trainer(tmp: Path | None = None, epochs: int = 1, **kwargs) -> Trainer:
    return Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        max_epochs=epochs, default_root_dir=tmp, enable_checkpointing=tmp is not None,
        num_sanity_val_steps=0, **kwargs,
    )  # fmt: skip


@pytest.fixture(scope="module")
def reference_ckpt(prepared, tmp_path_factory) -> Path:
    """A SASRec reference trained 1 epoch, saved as a checkpoint."""
    seed_everything(0)
    data = SequenceDataModule(prepared, max_len=8, batch_size=16, mode="sequence")
    module = ReferenceModule("sasrec", SASREC, data.n_items, data.n_users, loss="ce", lr=1e-2)
    fit = trainer(epochs=1)
    fit.fit(module, data)
    path = tmp_path_factory.mktemp("ref") / "reference.ckpt"
    fit.save_checkpoint(path)
    return path


# --------------------------------------------------------------------------- data


def test_directory_without_manifest_is_refused(prepared, tmp_path):
    (tmp_path / "train.parquet").write_bytes((prepared / "train.parquet").read_bytes())
    with pytest.raises(DataError, match="manifest"):
        load_prepared(tmp_path)


def test_sequence_windows_are_the_train_sequence_shifted(prepared):
    data = SequenceDataModule(prepared, max_len=4, batch_size=1000, mode="sequence")
    data.setup()
    batch = next(iter(data.train_dataloader()))
    # length 6 with L=4: windows over targets 2..6 of sizes 4 and 1, cut from the end.
    assert len(batch["user_idx"]) == 2 * N_USERS
    for u, ctx, tgt, last in zip(batch["user_idx"].tolist(), batch["context"].tolist(),
                                 batch["targets_seq"].tolist(), batch["target"].tolist(),
                                 strict=True):  # fmt: skip
        seq = cyclic(u, TRAIN_LEN)
        real = [i for i in ctx if i]
        start = next(s for s in range(TRAIN_LEN) if seq[s : s + len(real)] == real)
        assert ctx == [0] * (4 - len(real)) + real
        assert tgt == [0] * (4 - len(real)) + seq[start + 1 : start + 1 + len(real)]
        assert last == tgt[-1]
    pairs = {(u, t) for u, row in zip(batch["user_idx"].tolist(), batch["targets_seq"].tolist(),
                                      strict=True) for t in row if t}  # fmt: skip
    assert pairs == {(u, i) for u in range(N_USERS) for i in cyclic(u, TRAIN_LEN)[1:]}


def test_pointwise_examples_and_validation_rows(prepared):
    data = SequenceDataModule(prepared, max_len=3, batch_size=1000, mode="pointwise")
    data.setup()
    batch = next(iter(data.train_dataloader()))
    got = sorted(zip(batch["user_idx"].tolist(), map(tuple, batch["context"].tolist()),
                     batch["target"].tolist(), strict=True))  # fmt: skip
    want = []
    for u in range(N_USERS):
        seq = cyclic(u, TRAIN_LEN)
        for t in range(1, TRAIN_LEN):
            ctx = seq[max(0, t - 3) : t]
            want.append((u, tuple([0] * (3 - len(ctx)) + ctx), seq[t]))
    assert got == sorted(want)
    valid = next(iter(data.val_dataloader()))
    assert valid["target"].tolist() == [cyclic(u, TRAIN_LEN + 1)[-1] for u in range(N_USERS)]
    assert valid["context"][0].tolist() == cyclic(0, TRAIN_LEN)[-3:]
    assert sorted(valid["seen"][0].tolist()) == sorted(cyclic(0, TRAIN_LEN))


def test_pairs_are_padded_and_masked(prepared):
    data = PairDataModule(prepared, max_len=8, batch_size=1000)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    frame = pl.read_parquet(prepared / "pairs_train.parquet")
    order = batch["user_idx"].argsort()
    assert batch["rejected"].shape == (N_USERS, 3)
    for row, (rej, mask) in enumerate(zip(batch["rejected"][order].tolist(),
                                          batch["rejected_mask"][order].tolist(), strict=True)):  # fmt: skip
        want = frame["rejected"][row].to_list()
        assert rej == want + [0] * (3 - len(want))
        assert mask == [True] * len(want) + [False] * (3 - len(want))
    assert len(data.val_dataloader()) == 2
    capped = PairDataModule(prepared, max_negatives=2, batch_size=1000)
    capped.setup()
    assert next(iter(capped.train_dataloader()))["rejected"].shape == (N_USERS, 2)


def test_max_pairs_per_user_keeps_each_users_most_recent_pairs(prepared, tmp_path):
    root = tmp_path / "prepared"
    shutil.copytree(prepared, root)
    pairs = pl.read_parquet(prepared / "pairs_train.parquet")
    older = pairs.with_columns(pl.col("timestamp") - 1, pl.col("chosen") % N_REAL + 1)
    pl.concat([older, pairs]).write_parquet(root / "pairs_train.parquet")
    data = PairDataModule(root, max_len=8, batch_size=1000, max_pairs_per_user=1)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    order = batch["user_idx"].argsort()
    assert batch["user_idx"][order].tolist() == pairs["user_idx"].to_list()
    assert batch["chosen"][order].tolist() == pairs["chosen"].to_list()
    with pytest.raises(ValueError, match="max_pairs_per_user must be >= 1"):
        PairDataModule(root, max_pairs_per_user=0)


def test_pairs_since_keeps_the_pairs_of_events_at_or_after_it(prepared, tmp_path):
    """train.pairs_since (the retraining replay's newest logs): exactly the pairs whose chosen
    event is at or after it, before max_pairs_per_user; none left is refused, naming it."""
    root = tmp_path / "prepared"
    shutil.copytree(prepared, root)
    pairs = pl.read_parquet(prepared / "pairs_train.parquet")
    since = int(pairs["timestamp"].min())
    span = int(pairs["timestamp"].max()) - since + 1  # every older pair lies before `since`
    older = pairs.with_columns(pl.col("timestamp") - span, pl.col("chosen") % N_REAL + 1)
    pl.concat([older, pairs]).write_parquet(root / "pairs_train.parquet")
    for max_pairs in (None, 1):
        data = PairDataModule(root, max_len=8, batch_size=1000, pairs_since=since,
                              max_pairs_per_user=max_pairs)  # fmt: skip
        data.setup()
        batch = next(iter(data.train_dataloader()))
        order = batch["user_idx"].argsort()
        assert batch["chosen"][order].tolist() == pairs["chosen"].to_list()
    after_all = int(pairs["timestamp"].max()) + 1
    with pytest.raises(DataError, match=rf"pairs_train.parquet: .*train.pairs_since={after_all}"):
        PairDataModule(root, pairs_since=after_all).setup()


# --------------------------------------------------------------------------- ranking


def test_target_rank_matches_a_sort_and_seen_items_are_removed():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 20, generator=gen)
    scores[:, 0] = float("-inf")
    target = torch.tensor([1, 5, 7, 19, 3])
    seen = torch.tensor([[2, 0], [4, 6], [0, 0], [1, 18], [5, 9]])
    masked = mask_seen(scores, seen)
    for b in range(5):
        allowed = [i for i in range(1, 20) if i not in seen[b].tolist() or i == 0]
        ranked = sorted(allowed, key=lambda i: -scores[b, i].item())
        assert target_rank(masked, target)[b] == ranked.index(target[b].item())
    hit, ndcg = hit_and_ndcg(torch.tensor([0, 3, 10]), k=10)
    assert hit.tolist() == [1, 1, 0]
    assert torch.allclose(ndcg, torch.tensor([1.0, 1 / math.log2(5), 0.0]))


def test_ties_count_against_the_target():
    assert target_rank(torch.zeros(1, 6), torch.tensor([2])).item() == 5


def test_reference_fit_beats_random(prepared):
    seed_everything(0)
    data = SequenceDataModule(prepared, max_len=8, batch_size=16, mode="sequence")
    module = ReferenceModule("sasrec", {**SASREC, "dropout": 0.0}, data.n_items, data.n_users,
                             loss="ce", lr=2e-2)  # fmt: skip
    fit = trainer(epochs=25, check_val_every_n_epoch=25)
    fit.fit(module, data)
    random_hr = 10 / (N_REAL - TRAIN_LEN)
    assert fit.callback_metrics["val/hr_at_10"] > random_hr + 0.3


# --------------------------------------------------------------------------- preference


def test_reference_is_frozen_and_never_saved(prepared, reference_ckpt, tmp_path):
    data = PairDataModule(prepared, max_len=8, batch_size=16)
    module = PreferenceModule(str(reference_ckpt), data.n_items, data.n_users, lr=1e-2)
    before = {k: v.clone() for k, v in module.reference.state_dict().items()}
    fit = trainer(tmp_path, epochs=1)
    fit.fit(module, data)
    after = module.reference.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    policy = module.policy.state_dict()
    assert any(not torch.equal(before[k], policy[k]) for k in before), "policy did not train"
    optimised = {id(p) for g in fit.optimizers[0].param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in module.reference.parameters()}
    assert not any(p.requires_grad for p in module.reference.parameters())
    saved = torch.load(fit.checkpoint_callback.best_model_path, weights_only=True)
    assert saved["state_dict"].keys() == {f"policy.{k}" for k in policy}
    reloaded = load_model(fit.checkpoint_callback.best_model_path)
    assert all(torch.equal(reloaded.state_dict()[k], policy[k]) for k in policy)
    for name in ("rewards/margins", "logps/chosen", "kl/policy_ref", "entropy/policy",
                 "grad_norm", "val/hr_at_10", "val/preference/accuracy"):  # fmt: skip
        assert name in fit.callback_metrics, name


def test_at_the_reference_rewards_are_zero_and_dpo_is_log2(prepared, reference_ckpt):
    data = PairDataModule(prepared, max_len=8, batch_size=16)
    data.setup()
    module = PreferenceModule(str(reference_ckpt), data.n_items, data.n_users, beta=0.5)
    module.train()
    loss, metrics = module.preference_step(next(iter(data.train_dataloader())))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "kl/policy_ref"):
        assert metrics[name].item() == pytest.approx(0.0, abs=1e-6), name
    assert metrics["logps/chosen"] < 0


def test_sft_objective_is_alpha_times_the_catalog_cross_entropy_of_chosen(prepared, reference_ckpt):
    data = PairDataModule(prepared, max_len=8, batch_size=16)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    module = PreferenceModule(str(reference_ckpt), data.n_items, data.n_users, objective="sft",
                              sft_alpha=0.7)  # fmt: skip
    module.train()
    loss, _ = module.preference_step(batch)
    with torch.no_grad():
        real_items = module.policy.full_scores(batch)[:, 1:]  # column 0 is padding
        nll = -real_items.log_softmax(-1).gather(1, (batch["chosen"] - 1).unsqueeze(1)).mean()
    assert loss.item() == pytest.approx(0.7 * nll.item(), rel=1e-5)


def test_kto_at_the_reference_is_one_half_and_its_step_moves_the_policy(prepared, reference_ckpt):
    """At policy == reference every r = 0 and the exact-KL reference point is 0, so each row's
    loss is lambda - lambda sigma(0) = 1/2; a step then raises chosen over rejected."""
    data = PairDataModule(prepared, max_len=8, batch_size=16)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    module = PreferenceModule(str(reference_ckpt), data.n_items, data.n_users, objective="kto",
                              beta=1.0, lr=1e-2)  # fmt: skip
    module.train()
    loss, metrics = module.preference_step(batch)
    assert loss.item() == pytest.approx(0.5, abs=1e-6)
    assert metrics["kl/policy_ref"].item() == pytest.approx(0.0, abs=1e-6)
    optimizer = module.configure_optimizers()
    for _ in range(5):
        optimizer.zero_grad()
        module.preference_step(batch)[0].backward()
        optimizer.step()
    assert module.preference_step(batch)[1]["rewards/margins"] > 0


def test_precomputed_reference_gives_the_same_loss(prepared, reference_ckpt):
    data = PairDataModule(prepared, max_len=8, batch_size=16)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    live = PreferenceModule(str(reference_ckpt), data.n_items, data.n_users, objective="sdpo")
    pre = PreferenceModule(str(reference_ckpt), data.n_items, data.n_users, objective="sdpo",
                           precompute=True)  # fmt: skip
    assert pre.reference is None
    with torch.no_grad():
        logp = torch.log_softmax(live.reference.full_scores(batch), dim=-1)
        rejected = torch.where(batch["rejected_mask"], batch["rejected"], 1)
        batch_pre = {**batch, "ref_chosen": logp.gather(1, batch["chosen"][:, None])[:, 0],
                     "ref_rejected": logp.gather(1, rejected)}  # fmt: skip
        # move the policy so the two losses differ from log 2
        next(live.policy.parameters()).add_(0.1)
        next(pre.policy.parameters()).add_(0.1)
        assert live.preference_step(batch)[0] == pytest.approx(
            pre.preference_step(batch_pre)[0].item(), abs=1e-5)  # fmt: skip


def test_mismatched_reference_is_refused(reference_ckpt):
    with pytest.raises(ValueError, match=rf"n_items={N_REAL + 1}.*n_items=99"):
        PreferenceModule(str(reference_ckpt), n_items=99, n_users=N_USERS)


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"beta": 0.0}, "beta must be > 0"), ({"objective": "nope"}, "unknown objective"),
     ({"gamma": 0.5}, "does not use"), ({"objective": "cdpo", "label_smoothing": 0.7},
                                        "label_smoothing"), ({"sft_alpha": -1.0}, "sft_alpha"),
     ({"lambda_u": 2.0}, "does not use"), ({"objective": "kto", "lambda_d": 0.0}, "lambda_d"),
     ({"objective": "kto", "precompute": True}, "precompute=false"),
     ({"objective": "sft"}, "sft_alpha > 0")],
)  # fmt: skip
def test_invalid_objective_settings_fail_at_construction(reference_ckpt, settings, message):
    with pytest.raises(ValueError, match=message):
        PreferenceModule(str(reference_ckpt), n_items=N_REAL + 1, n_users=N_USERS, **settings)


def test_nan_loss_stops_the_run(prepared, reference_ckpt):
    data = PairDataModule(prepared, max_len=8, batch_size=16)
    module = PreferenceModule(str(reference_ckpt), data.n_items, data.n_users, objective="ipo")
    scores = module.policy.full_scores
    module.policy.full_scores = lambda batch: scores(batch) * float("nan")
    with pytest.raises(DataError, match=r"preference stage: the ipo loss .* is nan at epoch 0 "
                       r"step 0, so the run diverged: lower train.lr"):  # fmt: skip
        trainer(epochs=1).fit(module, data)


# --------------------------------------------------------------------------- resume


def weights_after(prepared: Path, tmp: Path, plan: list[int]) -> dict[str, torch.Tensor]:
    """Train a dropout SASRec with sampled negatives, stopping at each epoch count in `plan`
    and resuming from the last checkpoint: every random draw must be replayed exactly."""
    ckpt = None
    for epochs in plan:  # each fit is a fresh process: new module, new data, same seed
        seed_everything(0)
        data = SequenceDataModule(prepared, max_len=8, batch_size=16, mode="sequence", seed=3)
        module = ReferenceModule("sasrec", SASREC, data.n_items, data.n_users, loss="bce",
                                 num_negatives=4, lr=1e-2)  # fmt: skip
        fit = trainer(tmp, epochs=epochs, deterministic=True,
                      callbacks=[StepSeed(7), ModelCheckpoint(dirpath=tmp, save_last=True)])  # fmt: skip
        fit.fit(module, data, ckpt_path=ckpt)
        ckpt = tmp / "last.ckpt"
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_resume_from_last_checkpoint_is_bit_exact(prepared, tmp_path):
    straight = weights_after(prepared, tmp_path / "a", [2])
    resumed = weights_after(prepared, tmp_path / "b", [1, 2])
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.parametrize("loss", ["ce", "sampled_softmax", "bce", "gbce", "bpr"])
@pytest.mark.parametrize(("model", "mode"), [("sasrec", "sequence"), ("two_tower", "pointwise")])
def test_every_reference_loss_lowers_itself(prepared, model, mode, loss):
    seed_everything(0)
    data = SequenceDataModule(prepared, max_len=8, batch_size=1000, mode=mode)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    cfg = {**SASREC, "dropout": 0.0} if model == "sasrec" else {"dim": 16, "dropout": 0.0}
    module = ReferenceModule(model, cfg, data.n_items, data.n_users, loss=loss, num_negatives=8)
    optimizer = module.configure_optimizers()
    losses = []
    for step in range(20):
        torch.manual_seed(step % 2)  # the same negatives every other step
        loss_value = module.reference_loss(batch)
        optimizer.zero_grad()
        loss_value.backward()
        optimizer.step()
        losses.append(loss_value.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-2] < losses[0]
