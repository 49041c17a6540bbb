"""Coat (data=coat): the reader against the README's hand counts, the `mcar` split (a seeded
valid slice of the MNAR ratings, the MCAR test untouched by pairs and training), the MCAR
metrics against a brute force, and `experiment=coat_mf_dpo` end to end with MLflow records.
The real files come from ../shared/data/coat (or RECSYS_DPO_SHARED_DATA); absent, they skip."""

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import SHARED_DATA, run_pipeline, shared_file
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow.tracking import MlflowClient

from recsys_dpo.data.datamodule import load_prepared
from recsys_dpo.data.prepare import prepare_dataset
from recsys_dpo.data.readers import read_coat
from recsys_dpo.data.schema import ITEM_IDX, USER_IDX
from recsys_dpo.data.splits import mcar
from recsys_dpo.errors import DataError
from recsys_dpo.evaluation.metrics import coat_paper_ranking, global_auc, mcar_metrics

# /work/shared/data/coat/README.md
TRAIN_HIST = {1: 1901, 2: 1437, 3: 1717, 4: 1275, 5: 630}
TEST_HIST = {1: 1879, 2: 899, 3: 1002, 4: 641, 5: 219}
SPLIT = {"kind": "mcar", "valid_frac": 0.2, "relevant": 4.0, "seed": 0}
PAIRS = {"feedback": {"high": 4.0, "low": 2.0, "max_negatives": 4, "max_context": 50}}


@pytest.fixture(scope="module")
def coat() -> Path:
    shared_file("coat", "train.ascii")
    return shared_file("coat", "test.ascii").parent


@pytest.fixture(scope="module")
def prepared(coat, tmp_path_factory):
    out = tmp_path_factory.mktemp("coat") / "prepared"
    prepare_dataset(read_coat(coat), str(coat), out, validation={"min_events_per_user": 3},
                    split=SPLIT, pairs=PAIRS, pair_splits=["train", "valid"],
                    config={"data": {"split": SPLIT}}, progress=False)  # fmt: skip
    return load_prepared(out)


def test_reader_matches_the_readme_counts(coat):
    log = read_coat(coat).collect()
    by = {e: log.filter(pl.col("event") == e) for e in ("mnar", "mcar")}
    assert by["mnar"].height == 6960 and by["mcar"].height == 4640
    assert log["user_id"].n_unique() == 290 and log["item_id"].n_unique() == 300
    for event, hist in (("mnar", TRAIN_HIST), ("mcar", TEST_HIST)):
        counts = by[event]["rating"].value_counts().sort("rating")
        assert dict(zip(counts["rating"].cast(int), counts["count"], strict=True)) == hist
    # 24 chosen and 16 random items per user; relevance is rating >= 4 on the MCAR rows only
    assert set(by["mnar"].group_by("user_id").len()["len"]) == {24}
    assert set(by["mcar"].group_by("user_id").len()["len"]) == {16}
    assert by["mnar"]["clicked"].all()
    assert by["mcar"]["clicked"].to_list() == (by["mcar"]["rating"] >= 4).to_list()
    both = by["mcar"].group_by("user_id").agg(pl.col("clicked").any() & ~pl.col("clicked").all())
    assert both["clicked"].sum() == 237


def test_reader_refuses_a_bad_matrix(tmp_path):
    (tmp_path / "train.ascii").write_text("0 1 7\n2 0 0\n")
    with pytest.raises(DataError, match=r"train.ascii: line 1, column 3 holds 7"):
        read_coat(tmp_path)
    (tmp_path / "train.ascii").write_text("0 1 5\n2 0 0\n")
    (tmp_path / "test.ascii").write_text("0 1\n2 0\n")
    with pytest.raises(DataError, match=r"test.ascii: 2 users x 2 items, but the train matrix"):
        read_coat(tmp_path)
    with pytest.raises(DataError, match="no such file"):
        read_coat(tmp_path / "absent")


def _toy_log(n_users: int = 6, n_rows: int = 10) -> pl.DataFrame:
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(n_users), n_rows).astype(str)
    events = np.where(np.tile(np.arange(n_rows), n_users) < 3, "mcar", "mnar")
    return pl.DataFrame({
        "user_idx": users, "item_id": np.tile(np.arange(n_rows), n_users).astype(str),
        "timestamp": np.where(events == "mcar", 2, 0), "clicked": events == "mnar",
        "rating": rng.integers(1, 6, len(users)).astype(float), "event": events,
        "seq": np.arange(len(users)),
    })  # fmt: skip


def test_mcar_split_holds_out_a_seeded_slice_of_the_train_rows():
    log = _toy_log()
    out = mcar(log, valid_frac=0.3, seed=5)
    assert out["split"].to_list() == mcar(log, valid_frac=0.3, seed=5)["split"].to_list()
    assert out["split"].to_list() != mcar(log, valid_frac=0.3, seed=6)["split"].to_list()
    # the test rows are the log's own, untouched; round(0.3 * 7) = 2 valid rows per user
    assert (out.filter(pl.col("event") == "mcar")["split"] == "test").all()
    assert out.filter(pl.col("split") == "test").equals(
        log.filter(pl.col("event") == "mcar").with_columns(
            pl.lit("test").alias("split"), pl.lit(None, pl.Utf8).alias("request_id")
        ).select(out.columns)
    )
    valid = out.filter(pl.col("split") == "valid")
    assert set(valid.group_by("user_idx").len()["len"]) == {2}
    assert (valid["event"] == "mnar").all()
    assert valid["clicked"].to_list() == (valid["rating"] >= 4).to_list()
    assert (valid["timestamp"] == 1).all()
    assert valid["request_id"].to_list() == [f"valid-{u}" for u in valid["user_idx"]]
    # a user's draw does not depend on the other users
    alone = mcar(log.filter(pl.col("user_idx") == "3"), valid_frac=0.3, seed=5)
    assert alone["split"].to_list() == out.filter(pl.col("user_idx") == "3")["split"].to_list()


def test_mcar_split_needs_event_and_rating():
    with pytest.raises(DataError, match=r"mcar split: the log has no column\(s\) \['event'\]"):
        mcar(_toy_log().drop("event"))


def test_prepared_coat_keeps_test_out_of_train_valid_and_pairs(prepared):
    events = {s: prepared.events(s) for s in ("train", "valid", "test")}
    assert {s: f.height for s, f in events.items()} == {"train": 5510, "valid": 1450,
                                                        "test": 4640}  # fmt: skip
    assert prepared.n_users == 290 and prepared.n_items == 301
    key = pl.col("user_idx").cast(pl.Int64) * 1000 + pl.col("item_idx")
    keys = {s: set(f.select(key)["user_idx"]) for s, f in events.items()}
    assert not keys["train"] & keys["valid"]
    # the test split is exactly test.ascii: no MNAR row, every MCAR one
    assert (events["test"]["event"] == "mcar").all()
    assert not (events["train"]["event"] == "mcar").any()
    assert not (events["valid"]["event"] == "mcar").any()
    assert not prepared.has_pairs("test")
    for split, allowed in (("train", ["train"]), ("valid", ["train", "valid"])):
        pairs = prepared.pairs(split).explode("rejected")
        owned = set(pl.concat([events[s] for s in allowed]).select(key)["user_idx"])
        chosen = set(pairs.select(pl.col("user_idx").cast(pl.Int64) * 1000 + pl.col("chosen"))
                     ["user_idx"])  # fmt: skip
        rejected = set(pairs.select(pl.col("user_idx").cast(pl.Int64) * 1000
                                    + pl.col("rejected"))["user_idx"])  # fmt: skip
        assert chosen <= set(events[split].select(key)["user_idx"]) and rejected <= owned
        # contexts hold no item of a later split: a train context is train items only
        context = set(prepared.pairs(split).explode("context").drop_nulls("context")
                      .select(pl.col("user_idx").cast(pl.Int64) * 1000 + pl.col("context"))
                      ["user_idx"])  # fmt: skip
        assert context <= owned


def _brute(scores, relevant, groups, k):
    """Per user, by enumeration: AUC over every (relevant, other) pair; the list sorted by
    score with ties against the relevant items; NaN without both classes."""
    out = {"auc": [], f"ndcg_at_{k}": [], f"recall_at_{k}": []}
    for g in sorted(set(groups)):
        s = [x for x, gg in zip(scores, groups, strict=True) if gg == g]
        r = [bool(x) for x, gg in zip(relevant, groups, strict=True) if gg == g]
        pos = [a for a, y in zip(s, r, strict=True) if y]
        neg = [a for a, y in zip(s, r, strict=True) if not y]
        if not pos or not neg:
            for v in out.values():
                v.append(np.nan)
            continue
        wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
        out["auc"].append(wins / (len(pos) * len(neg)))
        ranked = [y for _, y in sorted(zip(s, r, strict=True), key=lambda t: (-t[0], t[1]))]
        dcg = sum(1 / np.log2(i + 2) for i, y in enumerate(ranked[:k]) if y)
        idcg = sum(1 / np.log2(i + 2) for i in range(min(k, len(pos))))
        out[f"ndcg_at_{k}"].append(dcg / idcg)
        out[f"recall_at_{k}"].append(sum(ranked[:k]) / len(pos))
    return {name: np.array(v) for name, v in out.items()}


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.integers(0, 4), st.integers(-3, 3), st.booleans()), min_size=1, max_size=40
    ),
    k=st.integers(1, 6),
)
def test_mcar_metrics_match_brute_force(rows, k):
    groups, scores, relevant = (np.array(c) for c in zip(*rows, strict=True))
    got = mcar_metrics(scores.astype(float), relevant, groups, k)
    want = _brute(scores.tolist(), relevant.tolist(), groups.tolist(), k)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-12, err_msg=name)


def _brute_paper(scores, relevant, groups, k):
    """The published code's loops (`ndcg_func` / `recall_func`, DR-JL / StableDR / TDR-CL), by
    enumeration: every user; NDCG 1 and recall 0 for a user with no relevant item; ties
    against the relevant items."""
    out = {f"ndcg_at_{k}": [], f"recall_at_{k}": []}
    for g in sorted(set(groups)):
        pairs = [(x, bool(y)) for x, y, gg in zip(scores, relevant, groups, strict=True) if gg == g]
        ranked = [y for _, y in sorted(pairs, key=lambda t: (-t[0], t[1]))]
        n_pos = sum(ranked)
        dcg = sum(1 / np.log2(i + 2) for i, y in enumerate(ranked[:k]) if y)
        idcg = sum(1 / np.log2(i + 2) for i in range(min(k, n_pos)))
        out[f"ndcg_at_{k}"].append(dcg / idcg if idcg > 0 else 1.0)
        out[f"recall_at_{k}"].append(sum(ranked[:k]) / max(1, n_pos))
    return {name: np.array(v) for name, v in out.items()}


def _brute_global_auc(scores, relevant):
    pos = [x for x, y in zip(scores, relevant, strict=True) if y]
    neg = [x for x, y in zip(scores, relevant, strict=True) if not y]
    if not pos or not neg:
        return np.nan
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (
        len(pos) * len(neg)
    )


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.integers(0, 4), st.integers(-3, 3), st.booleans()), min_size=1, max_size=40
    ),
    k=st.integers(1, 6),
)
def test_coat_paper_metrics_match_brute_force(rows, k):
    groups, scores, relevant = (np.array(c) for c in zip(*rows, strict=True))
    got = coat_paper_ranking(scores.astype(float), relevant, groups, k)
    want = _brute_paper(scores.tolist(), relevant.tolist(), groups.tolist(), k)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-12, err_msg=name)
    auc, brute = global_auc(scores.astype(float), relevant), _brute_global_auc(scores, relevant)
    assert auc == pytest.approx(brute, nan_ok=True, abs=1e-12)


def test_global_auc_is_not_the_mean_of_the_users_aucs():
    # each user ranks perfectly (per-user AUC 1), but user 1's scores all sit below user 0's
    scores = np.array([4.0, 3.0, 2.0, 1.0])
    relevant = np.array([True, False, True, False])
    groups = np.array([0, 0, 1, 1])
    assert np.nanmean(mcar_metrics(scores, relevant, groups, 1)["auc"]) == 1.0
    assert global_auc(scores, relevant) == pytest.approx(0.75)  # 3 of 4 (pos, neg) pairs


@pytest.mark.parametrize("experiment", ["coat_mf_dpo", "coat_two_tower_dpo"])
def test_coat_experiment_runs_end_to_end_with_mlflow_records(coat, tmp_path, experiment):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = run_pipeline("run.py", f"experiment={experiment}", f"paths.shared_data={SHARED_DATA}",
                        f"paths.artifacts={tmp_path / 'artifacts'}", f"tracking.uri={uri}",
                        "progress=false", f"hydra.run.dir={tmp_path / 'job'}", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "job" / "pipeline_result.json").read_text())
    assert result["ran"] == ["prepare", "reference", "preference", "evaluate", "export"]
    names = ("mcar/auc", "mcar/ndcg_at_5", "mcar/recall_at_5", "ndcg_at_10")
    (metrics_file,) = (tmp_path / "artifacts" / "eval").glob("*-test/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["counts"]["requests"] == 290  # every user's random items (paper protocol)
    for role in ("policy", "reference"):
        assert all(0 <= metrics["models"][role][n] <= 1 for n in names), metrics["models"][role]
    assert metrics["models"]["reference"]["mcar/auc"] > 0.5  # better than random
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("recsys-dpo").experiment_id])
    evaluate = next(r for r in runs if r.info.run_name == "evaluate")
    logged = evaluate.data.metrics
    for name in ("policy/mcar/ndcg_at_5", "reference/mcar/auc", "delta/mcar/recall_at_5"):
        role, metric = name.split("/", 1)
        if role == "delta":
            assert logged[name] == pytest.approx(metrics["deltas"][metric]["mean"]), name
        else:
            assert logged[name] == pytest.approx(metrics["models"][role][metric]), name


def test_study_compares_mcar_metrics_per_user(prepared):
    """The study runner's per-user table holds each user's mcar/ metrics, equal to a brute
    force over that user's own random test items, NaN exactly for users with one class."""
    import torch

    from recsys_dpo.evaluation.evaluator import evaluate
    from recsys_dpo.models import build_model
    from recsys_dpo.study.runner import with_request_metrics

    torch.manual_seed(0)
    model = build_model("mf", n_items=prepared.n_items, n_users=prepared.n_users, dim=8).eval()
    result = evaluate(model, prepared, "test", k=[5, 10])
    table = with_request_metrics(result, prepared)
    assert table.height == 290  # every user's random items, liked or not
    assert table[USER_IDX].to_list() == sorted(prepared.events("test")[USER_IDX].unique())
    ranked = table.filter(pl.col(USER_IDX).is_in(result.per_user[USER_IDX].implode()))
    assert ranked["ndcg_at_10"].to_list() == result.per_user["ndcg_at_10"].to_list()
    no_query = table.filter(~pl.col(USER_IDX).is_in(result.per_user[USER_IDX].implode()))
    assert no_query.height == 290 - result.per_user.height
    assert no_query["ndcg_at_10"].is_nan().all() or no_query["ndcg_at_10"].is_null().all()
    assert (no_query["coat_paper/ndcg_at_5"] == 1.0).all()  # nothing to rank: NDCG 1
    assert (no_query["coat_paper/recall_at_5"] == 0.0).all()
    test = prepared.events("test")
    users, items = test[USER_IDX].to_numpy(), test[ITEM_IDX].to_numpy()
    with torch.no_grad():  # MF's score: the dot product of its user and item vectors
        batch = {"user_idx": torch.as_tensor(users, dtype=torch.long),
                 "context": torch.zeros(len(users), 1, dtype=torch.long)}  # fmt: skip
        vectors = model.item_embeddings()[torch.as_tensor(items, dtype=torch.long)]
        scores = (model.user_embeddings(batch) * vectors).sum(1).double().numpy()
    expected = _brute(scores, test["clicked"].to_numpy(), users, 5)["ndcg_at_5"]
    got = dict(zip(table[USER_IDX].to_list(), table["mcar/ndcg_at_5"].to_list(), strict=True))
    for user, value in zip(sorted(set(users.tolist())), expected, strict=True):
        # a user without a relevant random item is no ranking query (no target): NaN anyway
        assert got.get(user, np.nan) == pytest.approx(value, nan_ok=True, abs=1e-6), user
    defined = np.isfinite(table["mcar/auc"].to_numpy()).sum()
    assert defined == 237  # the README's users with both a rating >= 4 and one below
    # The paper protocol: every one of the 290 users, and the AUC over all 4,640 rows pooled.
    all_users, all_items = test[USER_IDX].to_numpy(), test[ITEM_IDX].to_numpy()
    with torch.no_grad():
        batch = {"user_idx": torch.as_tensor(all_users, dtype=torch.long),
                 "context": torch.zeros(len(all_users), 1, dtype=torch.long)}  # fmt: skip
        vectors = model.item_embeddings()[torch.as_tensor(all_items, dtype=torch.long)]
        all_scores = (model.user_embeddings(batch) * vectors).sum(1).double().numpy()
    clicked = test["clicked"].to_numpy()
    assert len(all_scores) == 4640
    paper = _brute_paper(all_scores.tolist(), clicked.tolist(), all_users.tolist(), 5)
    assert result.aggregates["coat_paper/ndcg_at_5"] == pytest.approx(
        paper["ndcg_at_5"].mean(), abs=1e-6)  # fmt: skip
    assert result.aggregates["coat_paper/recall_at_5"] == pytest.approx(
        paper["recall_at_5"].mean(), abs=1e-6)  # fmt: skip
    assert result.aggregates["coat_paper/auc"] == pytest.approx(
        _brute_global_auc(all_scores, clicked), abs=1e-6)  # fmt: skip
    assert result.per_request.height == 290


def test_study_selects_on_an_mcar_metric_only_with_its_cut_off():
    from recsys_dpo.study.spec import MCAR_METRICS, _metric

    assert _metric("mcar/ndcg_at_5", [5, 10], "study.selection.metric") == "mcar/ndcg_at_5"
    assert "mcar/auc" in MCAR_METRICS
    with pytest.raises(DataError, match="mcar/ndcg_at_7"):
        _metric("mcar/ndcg_at_7", [5, 10], "study.selection.metric")


def test_study_report_gives_a_global_metric_per_reference_differences_without_a_ci():
    """coat_paper/auc has no per-user value: its difference is each reference's difference of
    the global figures (mean +- sd over references), no CI; a per-user metric keeps its CI."""
    from recsys_dpo.study.report import _ci, delta
    from recsys_dpo.study.runner import Entry, Evaluation

    def grid(aucs, ndcg):
        table = pl.DataFrame({USER_IDX: [1, 2, 3], "coat_paper/ndcg_at_5": ndcg})
        return [[Evaluation("k", "test", "m", table, {"coat_paper/auc": a})] for a in aucs]

    ref = Entry("reference", "reference", [], grid([0.70, 0.72, 0.74], [0.5, 0.6, 0.7]))
    row = Entry("dpo", "row", [], grid([0.71, 0.75, 0.74], [0.6, 0.7, 0.8]))
    d = delta(row, ref, "coat_paper/auc", 200, 0.95)
    assert d["lo"] is None and d["hi"] is None and d["global"]
    assert [p["mean"] for p in d["per_reference"]] == pytest.approx([0.01, 0.03, 0.0])
    assert d["mean"] == pytest.approx(0.04 / 3)
    assert d["sd"] == pytest.approx(np.std([0.01, 0.03, 0.0], ddof=1))
    assert "no CI" in _ci(d)
    per_user = delta(row, ref, "coat_paper/ndcg_at_5", 200, 0.95)
    assert per_user["lo"] == pytest.approx(0.1) and per_user["hi"] == pytest.approx(0.1)


@pytest.fixture(scope="module")
def featured(coat, tmp_path_factory):
    """Coat prepared with its user / item attributes (data.features)."""
    from recsys_dpo.data.readers import read_coat_features

    out = tmp_path_factory.mktemp("coat_features") / "prepared"
    prepare_dataset(read_coat(coat), str(coat), out, validation={"min_events_per_user": 3},
                    split=SPLIT, pairs=PAIRS, pair_splits=["train", "valid"],
                    config={"data": {"split": SPLIT}}, progress=False,
                    features=read_coat_features(coat))  # fmt: skip
    return load_prepared(out)


def test_prepared_features_are_aligned_to_the_vocab(coat, featured):
    """Each index's row is its raw id's line of the ascii file; one-hot rows sum to the number
    of attribute groups; the padding item is zeros; both files are hashed in the manifest."""
    from recsys_dpo.data.vocab import ITEMS_FILE, USERS_FILE

    for side, vocab_file, index, n_cols, n_rows in (
        ("user", USERS_FILE, USER_IDX, 14, featured.n_users),
        ("item", ITEMS_FILE, ITEM_IDX, 33, featured.n_items),
    ):
        raw = np.loadtxt(coat / f"{side}_features.ascii")
        names = [n for n in (coat / f"{side}_features_map.txt").read_text().splitlines() if n]
        groups = len({n.split(":")[0] for n in names})
        assert raw.shape[1] == n_cols == len(names) and groups == 4
        got = featured.features(side)
        assert got.shape == (n_rows, n_cols)
        vocab = pl.read_parquet(featured.path / vocab_file)
        for raw_id, idx in zip(vocab[f"{side}_id"].to_list(), vocab[index].to_list(), strict=True):
            np.testing.assert_array_equal(got[idx], raw[int(raw_id)], err_msg=f"{side} {raw_id}")
        real = got[1:] if side == "item" else got
        assert (real.sum(axis=1) == groups).all()
        assert f"{side}_features.parquet" in featured.files
        assert len(featured.files[f"{side}_features.parquet"]["sha256"]) == 64
    assert (featured.features("item")[0] == 0).all()
    assert featured.n_items - 1 == 300  # every coat was rated at least once


def test_reader_refuses_features_wider_than_their_map(coat, tmp_path):
    from recsys_dpo.data.readers import read_coat_features

    for name in ("user_features.ascii", "user_features_map.txt", "item_features.ascii",
                 "item_features_map.txt"):  # fmt: skip
        (tmp_path / name).write_text((coat / name).read_text())
    (tmp_path / "item_features_map.txt").write_text("gender:men\n")
    with pytest.raises(DataError, match="item_features.ascii: 33 columns, but"):
        read_coat_features(tmp_path)


def test_prepare_refuses_bad_features_in_one_line(coat, tmp_path):
    """Through the command: the features reader's DataError is the one-line exit 2 (hydra's
    instantiate wrapped it in InstantiationException and a traceback before)."""
    bad = tmp_path / "shared" / "coat"
    bad.mkdir(parents=True)
    for path in coat.iterdir():
        (bad / path.name).write_bytes(path.read_bytes())
    (bad / "item_features_map.txt").write_text("gender:men\n")
    done = run_pipeline("prepare.py", "data=coat", f"paths.shared_data={tmp_path / 'shared'}",
                        f"paths.artifacts={tmp_path / 'artifacts'}", "progress=false",
                        f"hydra.run.dir={tmp_path / 'job'}", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "item_features.ascii: 33 columns, but" in " ".join(done.stderr.split())


@pytest.mark.parametrize("features", ["ids_and_features", "features_only"])
def test_two_tower_scores_depend_on_the_features(featured, features):
    """Changing one item's attribute row changes that item's score and no other item's;
    changing a user's row changes that user's scores."""
    import torch

    from recsys_dpo.models import build_model

    torch.manual_seed(0)
    user, item = (torch.from_numpy(featured.features(s)) for s in ("user", "item"))
    model = build_model("two_tower", n_items=featured.n_items, n_users=featured.n_users, dim=8,
                        hidden=[16], dropout=0.0, features=features,
                        user_features_dim=user.shape[1], item_features_dim=item.shape[1]).eval()  # fmt: skip
    model.set_features(user, item)
    batch = {"user_idx": torch.tensor([0, 1]), "context": torch.tensor([[1, 2], [3, 0]])}

    def scores():
        with torch.no_grad():
            return model.user_embeddings(batch) @ model.item_embeddings().T

    before = scores()
    changed = item.clone()
    changed[5] = 1 - changed[5]
    model.set_features(user, changed)
    after = scores()
    assert not torch.allclose(after[:, 5], before[:, 5])
    others = [i for i in range(featured.n_items) if i != 5]
    torch.testing.assert_close(after[:, others], before[:, others])
    new_user = user.clone()
    new_user[1] = 1 - new_user[1]
    model.set_features(new_user, changed)
    last = scores()
    assert not torch.allclose(last[1], after[1])
    torch.testing.assert_close(last[0], after[0])


def test_two_tower_with_coat_features_trains_and_keeps_them_in_its_checkpoint(coat, tmp_path):
    """A tiny reference run with model.features: the prepare stage writes the matrices, the
    model loads them at build time, and they come back with the checkpoint."""
    from conftest import CONF
    from hydra import compose, initialize_config_dir

    from recsys_dpo.commands import prepare
    from recsys_dpo.training.reference_module import load_model
    from recsys_dpo.training.run import train_reference

    overrides = [f"paths.artifacts={tmp_path}", f"paths.shared_data={coat.parent}", "data=coat",
                 "model=two_tower", "model.features=ids_and_features", "model.dim=8",
                 "model.hidden=[8]", "trainer.max_epochs=1", "+trainer.limit_train_batches=3",
                 "+trainer.limit_val_batches=1", "+trainer.num_sanity_val_steps=0",
                 "train.batch_size=64", "progress=false", "tracking.enabled=false"]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        prepare.run(compose(config_name="config", overrides=overrides))
        cfg = compose(config_name="train_reference", overrides=overrides)
    out = json.loads((train_reference(cfg) / "result.json").read_text())
    data = load_prepared(cfg.paths.prepared)
    model = load_model(out["last_ckpt"])
    assert model.config["features"] == "ids_and_features"
    np.testing.assert_array_equal(model.item_features.numpy(), data.features("item"))
    np.testing.assert_array_equal(model.user_features.numpy(), data.features("user"))
