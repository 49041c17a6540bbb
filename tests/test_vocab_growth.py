"""A growing catalog (issue 17, point 2): a reference trained on one vocabulary is used, grown,
on a later log whose vocabulary extends it (`data.base_vocab`), and refused on one that does
not.

Properties of the vocabulary (hypothesis): an extension built by appending has its base's hash
as its prefix hash, and any permutation of the shared ids, or a removed id, is refused with
both hashes named. The growth rule per model, in closed form: old rows bit for bit, new rows
the mean of the known ones (a two-tower's attribute rows the data's own). End to end on a
tiny hand-made log in two periods: prepare the first, train an MF reference on it, prepare
the second extending the first's vocabulary, fine-tune it with `recsys-dpo train-preference`,
evaluate the policy against the grown reference (exact KL), and check that every new item is
retrieved by the real faiss path as soon as its score is the highest; the second log prepared
without the base (its items reordered) is refused through the CLI (exit 2, both hashes).
"""

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from conftest import bad_input_message, composed, run_pipeline
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig

from recsys_dpo.commands import evaluate as evaluate_cli
from recsys_dpo.data.datamodule import load_prepared
from recsys_dpo.data.prepare import prepare_dataset
from recsys_dpo.data.vocab import ITEMS_SCHEMA, USERS_SCHEMA, Vocab, build_vocab, check_extends
from recsys_dpo.errors import DataError
from recsys_dpo.evaluation.evaluator import build_queries, embed_users, item_vectors, retrieve
from recsys_dpo.models import MF, SASRec, TwoTower
from recsys_dpo.training.reference_module import (
    load_model,
    model_spec,
    read_checkpoint,
    trained_on,
)
from recsys_dpo.training.run import train_reference, train_reward


def vocab_of(items: list[str], users: list[str]) -> Vocab:
    """The vocabulary whose item_idx k + 1 is items[k] and user_idx k is users[k]."""
    return Vocab(
        pl.DataFrame({"item_id": items, "item_idx": range(1, len(items) + 1),
                      "count": [0] * len(items)}, schema=ITEMS_SCHEMA),
        pl.DataFrame({"user_id": users, "user_idx": range(len(users))}, schema=USERS_SCHEMA),
    )  # fmt: skip


ids = st.lists(st.text("abcxyz0123", min_size=1, max_size=4), min_size=1, max_size=12,
               unique=True)


@st.composite
def extension(draw: st.DrawFn) -> tuple[Vocab, Vocab]:
    """(base, extension): distinct item and user ids, the extension appending new ones."""
    items, users = draw(ids), draw(ids)
    cut_items = draw(st.integers(1, len(items)))
    cut_users = draw(st.integers(1, len(users)))
    return (vocab_of(items[:cut_items], users[:cut_users]), vocab_of(items, users))


@settings(max_examples=60, deadline=None)
@given(extension())
def test_an_appended_vocab_has_its_base_hash_as_prefix_hash(pair):
    base, extended = pair
    assert extended.content_hash(base.n_items, base.n_users) == base.content_hash()
    assert extended.extends(base.content_hash(), base.n_items, base.n_users)
    check_extends(base.content_hash(), (base.n_items, base.n_users), extended, "ref.ckpt")
    # the whole table's hash is the prefix of full length, as every manifest writes it
    assert extended.content_hash(extended.n_items, extended.n_users) == extended.content_hash()


logs = st.lists(st.tuples(st.sampled_from("uvwxyz"), st.sampled_from("abcdefgh"), st.booleans()),
                min_size=1, max_size=30)  # fmt: skip


def frame(rows: list[tuple[str, str, bool]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=["user_id", "item_id", "clicked"], orient="row")


@settings(max_examples=60, deadline=None)
@given(logs, logs)
def test_a_vocab_built_on_a_base_extends_it_whatever_the_logs(first, later):
    base = build_vocab(frame(first))
    grown = build_vocab(frame(later), base)
    assert grown.extends(base.content_hash(), base.n_items, base.n_users)
    for side, table in (("item", "items"), ("user", "users")):
        got = set(getattr(grown, table)[f"{side}_id"])
        assert got == {r[0 if side == "user" else 1] for r in first + later}
    # the ids the base lacks come after it, in the order a vocab of the later log alone has
    own = build_vocab(frame(later))
    for table, idx, first in (("items", "item_idx", base.n_items), ("users", "user_idx",
                                                                    base.n_users)):  # fmt: skip
        id_col = table[:-1] + "_id"
        known = set(getattr(base, table)[id_col])
        appended = getattr(grown, table).filter(pl.col(idx) >= first).sort(idx)[id_col]
        alone = getattr(own, table).sort(idx)[id_col]
        assert appended.to_list() == alone.filter(~alone.is_in(list(known))).to_list()


@settings(max_examples=60, deadline=None)
@given(extension(), st.data())
def test_any_permutation_of_the_shared_ids_is_refused_with_both_hashes(pair, data):
    base, extended = pair
    tables = {"item": extended.items["item_id"].to_list(),
              "user": extended.users["user_id"].to_list()}  # fmt: skip
    shared = {"item": base.n_items - 1, "user": base.n_users}
    sides = [side for side, n in shared.items() if n >= 2]
    assume(sides)
    side = data.draw(st.sampled_from(sides))
    n = shared[side]
    order = data.draw(st.permutations(range(n)).filter(lambda p: list(p) != sorted(p)))
    tables[side][:n] = [tables[side][k] for k in order]
    other = vocab_of(tables["item"], tables["user"])
    with pytest.raises(DataError) as refused:
        check_extends(base.content_hash(), (base.n_items, base.n_users), other, "ref.ckpt",
                      trained=base)  # fmt: skip
    message = str(refused.value)
    assert message.startswith(f"ref.ckpt: its vocabulary hash is {base.content_hash()}, but")
    assert f"the data's vocabulary hash is {other.content_hash()}" in message
    assert f"{side} id(s) moved" in message and "re-train" in message


def test_a_removed_id_is_refused_and_said_so():
    base = vocab_of(["a", "b", "c"], ["u", "v"])
    cases = {
        "it has 2 items and 2 users, the checkpoint's 3 and 2": vocab_of(["a", "b"], ["u", "v"]),
        "1 item id(s) removed, e.g. item_id 'b'": vocab_of(["a", "c", "d"], ["u", "v"]),
    }
    for said, other in cases.items():
        with pytest.raises(DataError, match="does not extend") as refused:
            check_extends(base.content_hash(), (base.n_items, base.n_users), other, "x",
                          trained=base)  # fmt: skip
        assert said in str(refused.value), str(refused.value)


def test_build_vocab_with_a_base_appends_the_unseen_ids_by_count_then_id():
    base = vocab_of(["b", "a"], ["v", "u"])
    log = pl.DataFrame({
        "user_id": ["w", "u", "x", "w", "x"], "item_id": ["z", "a", "c", "c", "y"],
        "clicked": [True, True, True, True, False],
    })  # fmt: skip
    grown = build_vocab(log, base)
    # b (absent from the log) keeps index 1; c (2 clicks) before y (0) and z (1)
    assert grown.items.rows() == [("b", 1, 0), ("a", 2, 1), ("c", 3, 2), ("z", 4, 1), ("y", 5, 0)]
    assert grown.users.rows() == [("v", 0), ("u", 1), ("w", 2), ("x", 3)]
    assert grown.extends(base.content_hash(), base.n_items, base.n_users)


def test_build_vocab_without_a_base_is_unchanged():
    """Pinned: the ids and hash the prepare stage gave before the base existed (computed by
    the previous build_vocab), so every manifest and checkpoint keeps matching."""
    log = pl.DataFrame({
        "user_id": ["u2", "u1", "u3", "u1", "u2"], "item_id": ["x", "y", "y", "z", "w"],
        "clicked": [True, True, True, False, True],
        "split": ["train", "train", "valid", "train", "train"],
    })  # fmt: skip
    vocab = build_vocab(log)
    assert vocab.items.rows() == [("w", 1, 1), ("x", 2, 1), ("y", 3, 1), ("z", 4, 0)]
    assert vocab.users.rows() == [("u1", 0), ("u2", 1), ("u3", 2)]
    assert vocab.content_hash() == PINNED


PINNED = "20f5e7e20d93828e"


N0, U0, N1, U1 = 7, 5, 11, 8  # tables of the base (padding row included) and of the extension


def grown(model: torch.nn.Module, **attributes: torch.Tensor) -> torch.nn.Module:
    """`model` grown to N1 / U1 rows through grow_state, rebuilt like a loaded checkpoint."""
    config, state = type(model).grow_state(model.config, model.state_dict(), N1, U1,
                                           attributes or None)  # fmt: skip
    bigger = type(model)(**config)
    bigger.load_state_dict(state)
    return bigger.eval()


def test_mf_grows_mean_rows_and_scores_a_new_item_in_closed_form():
    torch.manual_seed(0)
    model = MF(N0, U0, dim=5).eval()
    with torch.no_grad():
        model.item_bias.weight[1:].normal_()
    big = grown(model)
    for name in ("user_emb.weight", "item_emb.weight", "item_bias.weight"):
        old, new = model.state_dict()[name], big.state_dict()[name]
        assert torch.equal(new[: len(old)], old)  # bit for bit
    q, b, p = model.item_emb.weight[1:], model.item_bias.weight[1:, 0], model.user_emb.weight
    users = {"user_idx": torch.arange(U1), "context": torch.zeros(U1, 1, dtype=torch.long)}
    with torch.no_grad():
        scores = big.full_scores(users)
        mean_p = p.double().mean(0).float()
        # s(u, new) = <p_u, mean q> + mean b for a known user; a new user is the mean user
        expected = p @ q.double().mean(0).float() + b.double().mean().float()
        torch.testing.assert_close(scores[:U0, N0:], expected[:, None].expand(U0, N1 - N0))
        torch.testing.assert_close(scores[U0:, 1:N0], (mean_p @ q.T + b).expand(U1 - U0, -1))
        # known pairs score as before (up to the matmul's blocking over a larger catalog)
        torch.testing.assert_close(scores[:U0, :N0], model.full_scores({"user_idx":
                                                                        torch.arange(U0)}))  # fmt: skip


def test_sasrec_grows_its_tied_table_and_keeps_every_known_score():
    torch.manual_seed(0)
    model = SASRec(N0, dim=8, n_layers=1, n_heads=1, max_len=4, dropout=0.0).eval()
    big = grown(model)
    old = model.item_emb.weight
    assert torch.equal(big.item_emb.weight[:N0], old)
    torch.testing.assert_close(big.item_emb.weight[N0:], old[1:].mean(0).expand(N1 - N0, -1))
    history = {"user_idx": torch.zeros(2, dtype=torch.long),
               "context": torch.tensor([[0, 1, 2, 3], [4, 5, 6, 1]])}  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(big.full_scores(history)[:, :N0], model.full_scores(history))


def test_two_tower_takes_the_new_ids_attributes_from_the_data():
    torch.manual_seed(0)
    model = TwoTower(N0, U0, dim=8, hidden=[8], dropout=0.0, item_features_dim=3,
                     user_features_dim=2, features="ids_and_features").eval()  # fmt: skip
    items, users = torch.randn(N1, 3), torch.randn(U1, 2)
    items[0] = 0.0
    model.set_features(users[:U0], items[:N0])
    with pytest.raises(ValueError, match="item attributes for the grown vocabulary"):
        grown(model, user=users)
    big = grown(model, item=items, user=users)
    assert torch.equal(big.item_features, items) and torch.equal(big.user_features, users)
    assert torch.equal(big.item_emb.weight[:N0], model.item_emb.weight)
    with torch.no_grad():
        mean_e = model.item_emb.weight[1:].double().mean(0).float()
        content = model.item_tower(mean_e + model.feature_proj(items[N0:]))
        torch.testing.assert_close(big.item_embeddings()[N0:], content)
        torch.testing.assert_close(big.item_embeddings()[:N0], model.item_embeddings())


def test_a_model_does_not_shrink():
    with pytest.raises(ValueError, match="cannot grow"):
        MF.grow_state(MF(N1, U1).config, MF(N1, U1).state_dict(), N0, U1)


# The two periods of the log: users and items of days 1..t, then of a later window, which keeps
# some of both, drops items 0..7 and brings items and users the reference never saw.
FIRST = {"users": range(0, 60), "items": range(0, 24), "days": range(1, 5)}
LATER = {"users": range(30, 80), "items": range(8, 36), "days": range(5, 8)}
CLICKS = 8
SMALL = ("model=mf", "model.dim=9", "data.max_len=10", "trainer.max_epochs=1",
         "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
         "+trainer.num_sanity_val_steps=0", "train.batch_size=64", "progress=false",
         "tracking.enabled=false")  # fmt: skip
PREPARE = ("data=table", "data.max_len=10", "data.split.kind=loo", "data.pairs.next_item.seed=0",
           "progress=false")  # fmt: skip


def period_log(period: dict[str, range], path: Path) -> Path:
    """Each user of the period clicks CLICKS distinct items of it (fixed seed), one a day."""
    rng = np.random.default_rng(period["days"][0])
    users, items = list(period["users"]), list(period["items"])
    clicked = np.stack([rng.choice(items, CLICKS, replace=False) for _ in users])
    days = np.sort(rng.choice(period["days"], (len(users), CLICKS)), axis=1)
    pl.DataFrame({
        "user_id": np.repeat([f"u{u:02d}" for u in users], CLICKS),
        "item_id": [f"i{i:02d}" for i in clicked.reshape(-1)],
        "timestamp": (days * 86_400 + np.arange(CLICKS)).reshape(-1),
    }).write_parquet(path)  # fmt: skip
    return path


def config(name: str, prepared: Path, root: Path, *overrides: str) -> DictConfig:
    return composed(name, prepared, root, *SMALL, *overrides)


@pytest.fixture(scope="module")
def loop(tmp_path_factory) -> dict[str, Path]:
    """Days 1..t prepared (`first`) with an MF reference trained on it; the later window
    prepared by the CLI extending first's vocabulary (`later`), and without it (`alone`)."""
    root = tmp_path_factory.mktemp("growth")
    paths = {"root": root, "first": root / "first", "later": root / "later",
             "alone": root / "alone"}  # fmt: skip
    first_log, later_log = period_log(FIRST, root / "first.parquet"), period_log(
        LATER, root / "later.parquet")  # fmt: skip
    for name, log, base in (("first", first_log, None), ("later", later_log, paths["first"]),
                            ("alone", later_log, None)):  # fmt: skip
        extra = () if base is None else (f"+data.base_vocab={base}",)
        done = run_pipeline("prepare.py", *PREPARE, f"data.reader.path={log}",
                            f"paths.prepared={paths[name]}", *extra, cwd=root)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
    run = train_reference(config("train_reference", paths["first"], root,
                                 "trainer.max_epochs=3", "train.lr=1e-2",
                                 f"paths.runs={root / 'runs'}"))  # fmt: skip
    paths["reference"] = Path(json.loads((run / "result.json").read_text())["last_ckpt"])
    return paths


def test_the_later_vocab_extends_the_first_and_records_its_base(loop):
    first, later = load_prepared(loop["first"]), load_prepared(loop["later"])
    base, grown = Vocab.load(first.path), Vocab.load(later.path)
    assert later.n_items == 36 + 1 and later.n_users == 80  # every id of both periods
    assert grown.extends(first.manifest["vocab_hash"], first.n_items, first.n_users)
    assert grown.items.head(first.n_items - 1).select("item_id", "item_idx").equals(
        base.items.select("item_id", "item_idx"))  # fmt: skip
    assert later.manifest["base_vocab"] == {
        "path": str(first.path), "vocab_hash": first.manifest["vocab_hash"],
        "n_items": first.n_items, "n_users": first.n_users}  # fmt: skip
    assert "base_vocab" not in first.manifest  # without the setting, the manifest of before
    # the same log on its own orders its items by its own counts: not an extension
    alone = Vocab.load(loop["alone"])
    assert not alone.extends(first.manifest["vocab_hash"], first.n_items, first.n_users)


def test_a_base_that_is_not_a_prepared_dataset_is_refused(loop, tmp_path):
    (tmp_path / "half").mkdir()  # a directory without a manifest: an unfinished prepare
    for base, said in ((tmp_path / "none", "no such directory"),
                       (tmp_path / "half", "no manifest.json")):  # fmt: skip
        done = run_pipeline("prepare.py", *PREPARE, f"data.reader.path={loop['root']}/later.parquet",
                            f"paths.prepared={tmp_path / 'out'}", f"+data.base_vocab={base}",
                            cwd=tmp_path)  # fmt: skip
        message = bad_input_message(done)
        assert f"data.base_vocab={base}: not a prepared dataset" in message and said in message
    assert not (tmp_path / "out").exists()


def test_the_reference_grows_on_the_later_data_and_keeps_its_rows(loop):
    first, later = load_prepared(loop["first"]), load_prepared(loop["later"])
    old = load_model(loop["reference"], trained_on(first))
    grown = load_model(loop["reference"], trained_on(later))
    assert (grown.n_items, grown.config["n_users"]) == (later.n_items, later.n_users)
    for name, table in old.state_dict().items():
        assert torch.equal(grown.state_dict()[name][: len(table)], table), name  # bit for bit
    # the real retrieval path ranks the whole grown catalog: every new item is in the index,
    # with the closed-form score of the mean item, s(u, new) = <p_u, mean q> + mean b
    queries = build_queries(later, "test")
    users = embed_users(grown, queries)
    n_real = later.n_items - 1
    none = [np.zeros(0, dtype=np.int64)] * len(queries)
    scores, items = retrieve(users, item_vectors(grown), none, k=n_real)
    new = np.arange(first.n_items, later.n_items)
    q, b = old.item_emb.weight[1:].detach().double(), old.item_bias.weight[1:, 0].detach().double()
    expected = (users[:, :-1].double() @ q.mean(0) + b.mean()).numpy()
    for row in range(len(queries)):
        assert set(items[row]) == set(range(1, later.n_items))
        got = scores[row][np.isin(items[row], new)]
        np.testing.assert_allclose(got, expected[row], rtol=1e-5, atol=1e-5)


def test_every_new_item_is_retrieved_when_its_score_is_highest(loop):
    first, later = load_prepared(loop["first"]), load_prepared(loop["later"])
    model = load_model(loop["reference"], trained_on(later))
    queries = build_queries(later, "test")
    users = embed_users(model, queries)
    for n, item in enumerate(range(first.n_items, later.n_items)):
        # a user who has not seen the item (the seen policy would remove it) gets it on top
        row = next(r for r in range(n, len(queries)) if item not in queries.seen[r])
        p = users[row, :-1]  # MF's user vector is [p_u, 1]
        with torch.no_grad():
            model.item_emb.weight[item] = 100.0 * p / p.square().sum()
            model.item_bias.weight[item] = 0.0
        _, top = retrieve(users, item_vectors(model), queries.seen, k=5)
        assert top[row, 0] == item, (item, top[row])
        with torch.no_grad():
            model.item_emb.weight[item] = 0.0  # out of the way of the next item's check


def test_the_policy_fine_tuned_on_the_later_window_is_evaluated_against_the_reference(loop):
    root, later = loop["root"], load_prepared(loop["later"])
    done = run_pipeline("train_preference.py", f"paths.prepared={loop['later']}",
                        f"reference.ckpt={loop['reference']}", f"paths.artifacts={root}",
                        f"paths.runs={root / 'runs'}", *SMALL, cwd=root)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = (root / "runs" / "preference").iterdir()
    policy_ckpt = json.loads((run / "result.json").read_text())["last_ckpt"]
    saved = read_checkpoint(policy_ckpt)
    # trained on the later data: its record and its sizes are the new vocabulary's
    assert saved["dataset"]["vocab_hash"] == later.manifest["vocab_hash"]
    assert saved["model"]["config"]["n_items"] == later.n_items
    assert saved["model"]["config"]["n_users"] == later.n_users
    policy = load_model(policy_ckpt, trained_on(later))
    reference = load_model(loop["reference"], trained_on(later))
    first_new = load_prepared(loop["first"]).n_items
    moved = ~torch.isclose(policy.item_emb.weight[first_new:], reference.item_emb.weight[first_new:])
    assert moved.any(), "no new item's row was trained"
    out = evaluate_cli.run(config("config", loop["later"], root, f"eval.ckpt={policy_ckpt}",
                                  f"reference.ckpt={loop['reference']}", "eval.k=[5]",
                                  f"eval.out_dir={root / 'eval'}"))  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    # the whole grown catalog, every test user (new ones too) and the exact KL over it
    assert metrics["counts"]["catalog_items"] == later.n_items - 1
    assert metrics["counts"]["users"] == len(LATER["users"])
    assert 0.0 < metrics["comparison"]["kl"] < float("inf")


def test_a_reordered_vocabulary_is_refused_naming_both_hashes(loop, tmp_path):
    first, alone = load_prepared(loop["first"]), load_prepared(loop["alone"])
    done = run_pipeline("train_preference.py", f"paths.prepared={loop['alone']}",
                        f"reference.ckpt={loop['reference']}", f"paths.artifacts={tmp_path}",
                        *SMALL, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    message = " ".join(done.stderr.split())  # rich wraps long lines
    for part in (f"reference.ckpt={loop['reference']}", first.manifest["vocab_hash"],
                 alone.manifest["vocab_hash"], "does not extend", "moved", "re-train"):  # fmt: skip
        assert part in message, (part, message)
    assert not (tmp_path / "runs").exists()


def test_the_control_and_the_reward_model_grow_too(loop, tmp_path):
    """mode=continue (the compute-matched control) and the reward model start from the
    reference like the policy, so they grow alike and record the later vocabulary."""
    later = load_prepared(loop["later"])
    for stage, name, extra in ((train_reference, "train_reference", ("mode=continue",)),
                               (train_reward, "train_reward", ())):  # fmt: skip
        run = stage(config(name, loop["later"], loop["root"], f"reference.ckpt={loop['reference']}",
                           f"paths.runs={tmp_path}", *extra))  # fmt: skip
        saved = read_checkpoint(json.loads((run / "result.json").read_text())["last_ckpt"])
        assert saved["dataset"]["vocab_hash"] == later.manifest["vocab_hash"], name
        assert saved["model"]["config"]["n_items"] == later.n_items, name


def with_attributes(log: Path, out: Path, base: Path | None) -> Path:
    """The period's log prepared with user and item attributes (a function of the id)."""
    items, users = range(36), range(80)
    features = {
        "item": pl.DataFrame({"item_id": [f"i{i:02d}" for i in items],
                              "a": [i / 36 for i in items], "b": [float(i % 3) for i in items]}),
        "user": pl.DataFrame({"user_id": [f"u{u:02d}" for u in users],
                              "c": [u / 80 for u in users]}),
    }  # fmt: skip
    prepare_dataset(
        pl.scan_parquet(log), source=str(log), out_dir=out,
        validation={"drop_duplicates": True, "min_events_per_user": 3}, split={"kind": "loo"},
        pairs={"next_item": {"num_negatives": 3, "max_context": 10, "seed": 0}},
        progress=False, features=features, base_vocab=base,
    )  # fmt: skip
    return out


def test_a_two_tower_with_attributes_takes_the_new_rows_from_the_later_features(loop, tmp_path):
    first = load_prepared(with_attributes(loop["root"] / "first.parquet", tmp_path / "a", None))
    later = load_prepared(with_attributes(loop["root"] / "later.parquet", tmp_path / "b",
                                          first.path))  # fmt: skip
    torch.manual_seed(0)
    model = TwoTower(first.n_items, first.n_users, dim=8, hidden=[8], item_features_dim=2,
                     user_features_dim=1, features="ids_and_features").eval()  # fmt: skip
    model.set_features(*(torch.from_numpy(first.features(s)) for s in ("user", "item")))
    ckpt = tmp_path / "two_tower.ckpt"
    torch.save({"model": model_spec(model, "model."), "dataset": trained_on(first),
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    big = load_model(ckpt, trained_on(later))
    assert torch.equal(big.item_features, torch.from_numpy(later.features("item")))
    assert torch.equal(big.user_features, torch.from_numpy(later.features("user")))
    assert torch.equal(big.item_emb.weight[: first.n_items], model.item_emb.weight)
    # the later data without attributes cannot grow it
    with pytest.raises(DataError, match=f"{loop['later']} extends its vocabulary but has no "
                                        "features for the new ids"):  # fmt: skip
        load_model(ckpt, trained_on(load_prepared(loop["later"])), "eval.ckpt=x")
