"""MLflow as the system of record (DESIGN.md, "Tracking and export").

A pipeline run is one PARENT run with one CHILD run per stage (tag `mlflow.parentRunId`, which
is what `mlflow ui` nests by). The composed config goes in flat as params (values cut to MLflow's
length limit) and whole as `config.yaml`; the prepared dataset's manifest as a run input whose
digest is the manifest's config hash; the candidate's registry version gets the alias
`candidate` or the tag `candidate=not_better`, and, when it was fine-tuned from a
`reference.source`, that source's `lineage.reference_*` tags (recsys_dpo/reference_source.py).
The experiment is tagged `mlflow.experimentKind=custom_model_development`, so the MLflow 3 UI
opens it in its model-training view (runs, metrics, models) rather than asking or showing the
GenAI one.

`check_reachable` probes an HTTP tracking server before any work, so a wrong `tracking.uri`
fails in seconds with one message instead of after training. `open_tracking` is how every
process first touches a store: on a fresh sqlite file it creates the schema under a file lock,
so several runs started at once on a new `tracking.uri=sqlite:///...` do not race in MLflow's
migrations (a tracking server serialises that itself).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import mlflow
import requests
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH
from omegaconf import DictConfig, OmegaConf
from sqlalchemy.engine import make_url

from recsys_dpo.artifacts import file_lock
from recsys_dpo.errors import DataError
from recsys_dpo.stage import flatten, plain

CANDIDATE_ALIAS = "candidate"
PARENT_TAG = "mlflow.parentRunId"
# The experiment tag the MLflow 3 UI picks its view by, and its model-training value.
EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
# How long a process waits for another one to finish setting up a fresh sqlite store.
SETUP_WAIT_S = 300.0


def check_reachable(uri: str, timeout: float = 3.0) -> None:
    """DataError unless an http(s) tracking server answers GET <uri>/health within `timeout`
    seconds; file and database stores need no probe."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        answer = requests.get(uri.rstrip("/") + "/health", timeout=timeout)
        answer.raise_for_status()
    except requests.RequestException as err:
        raise DataError(
            f"tracking.uri={uri}: the MLflow tracking server does not answer ({err}). Start it "
            "(mlflow server --host ... --port ...), fix tracking.uri, or use the local store "
            "tracking.uri=sqlite:///mlflow.db"
        ) from err


def _setup_lock(uri: str) -> Any:
    """The lock that serialises a store's set-up: `<db>.lock` beside a sqlite file (whose
    first users would all run MLflow's schema migrations at once), nothing otherwise."""
    if not uri.startswith("sqlite:"):
        return nullcontext()
    database = make_url(uri).database
    if not database or database == ":memory:":
        return nullcontext()
    db = Path(database)
    if not db.parent.is_dir():
        raise DataError(f"tracking.uri={uri}: the directory {db.parent} does not exist")
    return file_lock(db.parent / f"{db.name}.lock", f"tracking.uri={uri}", wait_s=SETUP_WAIT_S)


def open_tracking(uri: str, experiment: str) -> MlflowClient:
    """A client of `uri` whose tracking and registry schemas exist and which has the
    experiment `experiment`, tagged as model training (`EXPERIMENT_KIND`, unless it has a kind
    already), set up under `_setup_lock` (MLflow caches the store per process, so later
    clients and the fluent API reuse it without migrating again)."""
    with _setup_lock(uri):
        client = MlflowClient(uri)
        client.search_registered_models(max_results=1)  # creates the registry tables too
        found = client.get_experiment_by_name(experiment)
        if found is None:
            client.create_experiment(experiment, tags={EXPERIMENT_KIND: MODEL_TRAINING})
        elif EXPERIMENT_KIND not in found.tags:
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
    return client


def flat_params(config: Mapping[str, Any]) -> dict[str, str]:
    """Nested config -> {"a.b.c": value} with values cut to MLflow's param length limit."""
    return {name: str(value)[:MAX_PARAM_VAL_LENGTH] for name, value in flatten(config).items()}


class Tracker:
    """One pipeline's runs: `parent()` opens the parent run, `child(stage)` a nested stage run.

    With `tracking.enabled=false` every method does nothing and run ids are None.
    """

    def __init__(self, tracking: DictConfig, parent_id: str | None = None) -> None:
        """`parent_id`: a parent run another process holds open (a study's worker); this
        process's child runs go under it."""
        self.enabled = bool(tracking.enabled)
        self.uri = str(tracking.uri)
        self.experiment = str(tracking.experiment)
        self.client = open_tracking(self.uri, self.experiment) if self.enabled else None
        self.parent_id = parent_id
        if self.enabled and parent_id is not None:
            mlflow.set_tracking_uri(self.uri)
            mlflow.set_experiment(self.experiment)

    @contextmanager
    def parent(self, name: str, tags: Mapping[str, str]) -> Iterator[str | None]:
        """The pipeline's parent run, active (fluent API) inside the block."""
        if not self.enabled:
            yield None
            return
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_experiment(self.experiment)
        with mlflow.start_run(run_name=name, tags=dict(tags)) as run:
            yield run.info.run_id

    @contextmanager
    def child(self, stage: str) -> Iterator[str | None]:
        """A stage run nested under the active parent run."""
        if not self.enabled:
            yield None
            return
        with mlflow.start_run(run_name=stage, nested=True, parent_run_id=self.parent_id,
                              tags={"stage": stage}) as run:  # fmt: skip
            yield run.info.run_id

    def log_config(self, run_id: str | None, cfg: DictConfig, overrides: list[str]) -> None:
        """The resolved config as flat params (plus the command-line overrides) and as
        config.yaml."""
        if run_id is None:
            return
        params = flat_params(plain(cfg))
        params["overrides"] = " ".join(overrides)[:MAX_PARAM_VAL_LENGTH] or "(none)"
        items = [mlflow.entities.Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            chunk = items[start : start + MAX_PARAMS_TAGS_PER_BATCH]
            self.client.log_batch(run_id, params=chunk)
        self.client.log_text(run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")

    def log_dataset(self, run_id: str | None, path: Path, manifest: Mapping[str, Any]) -> None:
        """The prepared dataset as a run input (digest = the manifest's config hash) and its
        manifest as an artifact, on `run_id`, which must be the active run."""
        if run_id is None:
            return
        with warnings.catch_warnings():  # the local path matches two equivalent source kinds
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str(path.resolve()))
        dataset = MetaDataset(source, name=path.name, digest=str(manifest["config_hash"]))
        mlflow.log_input(dataset, context="training", tags={"n_items": str(manifest["n_items"])})
        self.client.log_dict(run_id, dict(manifest), "dataset_manifest.json")

    def log_metrics(self, run_id: str | None, values: Mapping[str, float]) -> None:
        """Finite numbers only (a NaN metric, e.g. an undefined CI, would fail the batch)."""
        if run_id is None:
            return
        clean = {k: float(v) for k, v in values.items() if v == v}
        metrics = [mlflow.entities.Metric(k, v, 0, 0) for k, v in clean.items()]
        for start in range(0, len(metrics), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(
                run_id, metrics=metrics[start : start + MAX_PARAMS_TAGS_PER_BATCH]
            )

    def log_artifacts(self, run_id: str | None, directory: Path, artifact_path: str) -> None:
        if run_id is not None:
            self.client.log_artifacts(run_id, str(directory), artifact_path)

    def set_tags(self, run_id: str | None, tags: Mapping[str, Any]) -> None:
        if run_id is not None:
            for key, value in tags.items():
                self.client.set_tag(run_id, key, str(value))

    def tag_version(self, model_name: str, version: str, tags: Mapping[str, str]) -> None:
        """Tags on a registered model version (e.g. the lineage of its reference)."""
        for key, value in tags.items():
            self.client.set_model_version_tag(model_name, version, key, value)

    def mark_candidate(self, model_name: str, version: str, better: bool) -> None:
        """Alias `candidate` on the version that beats the reference; otherwise the version is
        tagged `candidate=not_better` (and the alias, if any, stays where it was)."""
        if better:
            self.client.set_registered_model_alias(model_name, CANDIDATE_ALIAS, version)
            self.client.set_model_version_tag(model_name, version, "candidate", "better")
        else:
            self.client.set_model_version_tag(model_name, version, "candidate", "not_better")
