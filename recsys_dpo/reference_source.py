"""`reference.source`: where the reference comes from, resolved to the checkpoint the stages take.

    reference.source=models:/<name>@<alias>    a registered version by alias (e.g. production)
    reference.source=models:/<name>/<version>  a registered version by number
    reference.source=<bundle dir>              an export bundle (its policy.ckpt)
    reference.source=<file>.ckpt               a checkpoint of either training stage

The registry forms are resolved with MlflowClient against `tracking.uri` (the alias to its
version first, so an alias moved meanwhile cannot mix two versions); the version's artifacts are
downloaded once into `<paths.artifacts>/reference_sources/<name>/<version>/` (atomically:
a killed download is never taken as done) and reused while the registry still names the same
logged model there. The bundle inside (the one the pipeline registered: `artifacts/<bundle>/`)
is then checked like a bundle directory source: every file of its manifest against its sha256,
and the checkpoint against the manifest's `policy_sha256`, at every use. A bundle written
before bundles carried `policy.ckpt` is resolved to the checkpoint its manifest names
(`policy_ckpt`), when that file is still there with that sha256.

The result (`Lineage`) names the checkpoint and where it came from: the source as given, the
registered model, version and its source run, the checkpoint's sha256. The entry points
(`from_config`, `apply`) set `reference.ckpt` to it, clear `reference.source` (so the run's
config hash is the hash of a run given that checkpoint, and of no run before the key existed),
and record the lineage as tags on the stage's MLflow run (`tags`, through `tracking.tags`);
`recsys-dpo run` also tags the candidate's registered version and writes it into the bundle
manifest and the model card. Anything unusable (an unknown model or alias, an unreachable
server, a bundle whose files do not match, a source and a ckpt both set) is one DataError
naming `reference.source`.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf, open_dict
from sqlalchemy.engine import make_url

from recsys_dpo.artifacts import (
    MANIFEST,
    atomic_dir,
    file_sha256,
    read_manifest,
    verify_files,
)
from recsys_dpo.errors import DataError

# The checkpoint a bundle carries (recsys_dpo/export/bundle.py), what a bundle source resolves to.
BUNDLE_CHECKPOINT = "policy.ckpt"
# Under paths.artifacts: the downloaded registry versions, <name>/<version>/.
CACHE_DIR = "reference_sources"
# In each downloaded version: which registered version and logged model it holds.
CACHE_RECORD = "source.json"
REGISTRY = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))")
TAG_PREFIX = "lineage.reference_"


@dataclass(frozen=True)
class Lineage:
    """A resolved `reference.source`: the checkpoint to use and where it came from."""

    source: str
    kind: Literal["registry", "bundle", "checkpoint"]
    ckpt: str
    sha256: str
    model: str | None = None
    version: str | None = None
    alias: str | None = None
    # The registered version's source run (the pipeline's evaluate run, holding its metrics).
    run_id: str | None = None
    bundle: str | None = None

    @property
    def origin(self) -> str:
        """What the reference is, for the model card: models:/<name>/<version>, the bundle or
        the checkpoint."""
        if self.kind == "registry":
            return f"models:/{self.model}/{self.version}"
        return self.bundle if self.kind == "bundle" else self.ckpt

    def tags(self) -> dict[str, str]:
        """lineage.reference_<field> tags (MLflow runs, registered versions), unset ones left
        out."""
        return {f"{TAG_PREFIX}{k}": str(v) for k, v in asdict(self).items() if v is not None}

    def record(self) -> dict[str, Any]:
        """The lineage as plain data (the bundle manifest's `reference_source`)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def card_line(self) -> str:
        """The model card's provenance line."""
        notes = [] if self.source == self.origin else [f"reference.source={self.source}"]
        notes += [] if self.run_id is None else [f"its source run {self.run_id}"]
        given = f" ({'; '.join(notes)})" if notes else ""
        return f"- fine-tuned from {self.origin}{given}; reference checkpoint sha256 {self.sha256}"


def resolve(source: str, tracking_uri: str, cache: Path) -> Lineage:
    """`source` (a `reference.source` value) as a checked checkpoint and its lineage; registry
    versions are downloaded into `cache` once. DataError naming the setting otherwise."""
    setting = f"reference.source={source}"
    if source.startswith("models:/"):
        return _from_registry(source, tracking_uri, cache, setting)
    path = Path(source)
    if path.is_dir():
        return _from_bundle(path, setting)
    if path.is_file():
        return Lineage(source, "checkpoint", str(path), file_sha256(path))
    raise DataError(f"{setting}: no such checkpoint file or bundle directory, and not a "
                    "registry URI (models:/<name>@<alias> or models:/<name>/<version>)")  # fmt: skip


def bundle_checkpoint(bundle: Path, setting: str) -> tuple[Path, str]:
    """(checkpoint, sha256) of an export bundle, its manifest and every file it lists checked:
    its own policy.ckpt, or in a bundle without one the checkpoint its manifest names."""
    try:
        manifest = read_manifest(bundle)
        verify_files(bundle, manifest)
    except DataError as err:
        raise DataError(f"{setting}: {err}") from None
    if manifest.get("stage") != "export" or "policy_sha256" not in manifest:
        raise DataError(f"{setting}: {bundle} is not an export bundle (its {MANIFEST} is of "
                        f"stage {manifest.get('stage')!r})")  # fmt: skip
    wanted = manifest["policy_sha256"]
    inside = bundle / BUNDLE_CHECKPOINT
    ckpt = inside if BUNDLE_CHECKPOINT in manifest["files"] else Path(manifest["policy_ckpt"])
    if not ckpt.is_file():
        raise DataError(f"{setting}: the bundle {bundle} has no {BUNDLE_CHECKPOINT} (exported "
                        f"before bundles carried it) and the checkpoint it names, {ckpt}, is "
                        "not here; export the policy again, or pass that checkpoint")  # fmt: skip
    sha = file_sha256(ckpt)
    if sha != wanted:
        raise DataError(f"{setting}: {ckpt}: sha256 {sha[:12]} is not the bundle's policy_sha256 "
                        f"{wanted[:12]} ({bundle / MANIFEST}): it is another checkpoint")  # fmt: skip
    return ckpt, sha


def _from_bundle(bundle: Path, setting: str) -> Lineage:
    ckpt, sha = bundle_checkpoint(bundle, setting)
    return Lineage(setting.split("=", 1)[1], "bundle", str(ckpt), sha, bundle=str(bundle))


def _registry_client(uri: str, setting: str) -> Any:
    """An MlflowClient of `uri` once it is known to be there: an http(s) server answering, a
    sqlite file existing (MlflowClient would create an empty store)."""
    from mlflow import MlflowClient

    from recsys_dpo.tracking.mlflow_utils import check_reachable

    try:
        check_reachable(uri)
    except DataError as err:
        raise DataError(f"{setting}: {err}") from None
    if uri.startswith("sqlite:"):
        database = make_url(uri).database
        if database and database != ":memory:" and not Path(database).is_file():
            raise DataError(f"{setting}: tracking.uri={uri}: no such MLflow store (the file "
                            f"{database} does not exist); set tracking.uri to the registry "
                            "that holds the model")  # fmt: skip
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _version(client: Any, name: str, alias: str | None, version: str | None, uri: str,
             setting: str) -> Any:  # fmt: skip
    """The registered ModelVersion named by alias or number; DataError naming what is
    missing and what there is."""
    from mlflow.exceptions import MlflowException

    try:
        registered = client.get_registered_model(name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models(max_results=100))
        raise DataError(f"{setting}: tracking.uri={uri} has no registered model {name!r} "
                        f"(it has: {', '.join(names) or 'none'})") from None  # fmt: skip
    if alias is not None:
        if alias not in registered.aliases:
            raise DataError(f"{setting}: the registered model {name!r} has no alias {alias!r} "
                            f"(its aliases: {', '.join(sorted(registered.aliases)) or 'none'}); "
                            f"set one with MlflowClient().set_registered_model_alias({name!r}, "
                            f"{alias!r}, <version>)")  # fmt: skip
        return client.get_model_version_by_alias(name, alias)
    try:
        return client.get_model_version(name, version)
    except MlflowException:
        raise DataError(f"{setting}: the registered model {name!r} has no version {version}") from None


def _from_registry(source: str, uri: str, cache: Path, setting: str) -> Lineage:
    match = REGISTRY.fullmatch(source)
    if match is None:
        raise DataError(f"{setting}: a registry source is models:/<name>@<alias> or "
                        "models:/<name>/<version>")  # fmt: skip
    name, alias = match["name"], match["alias"]
    client = _registry_client(uri, setting)
    found = _version(client, name, alias, match["version"], uri, setting)
    version = str(found.version)
    local = _download(client, found, uri, cache / name / version, setting)
    bundles = sorted(p.parent for p in (local / "artifacts").glob(f"*/{MANIFEST}"))
    if len(bundles) != 1:
        raise DataError(f"{setting}: version {version} of {name!r} holds {len(bundles)} bundles "
                        f"under {local / 'artifacts'}, not one: it was not registered by "
                        "recsys-dpo run")  # fmt: skip
    ckpt, sha = bundle_checkpoint(bundles[0], setting)
    return Lineage(source, "registry", str(ckpt), sha, model=name, version=version,
                   alias=alias, run_id=found.run_id, bundle=str(bundles[0]))  # fmt: skip


def _download(client: Any, found: Any, uri: str, out: Path, setting: str) -> Path:
    """The model directory of the registered version `found` in `out`, downloaded unless
    `out` holds it already (the same logged model: another store may give the same name and
    number to another)."""
    name, version, logged = found.name, str(found.version), str(found.source)
    if (out / CACHE_RECORD).is_file():
        record = json.loads((out / CACHE_RECORD).read_text())
        if record.get("logged_model") == logged:
            return out / record["model_dir"]
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    with atomic_dir(out) as tmp:
        try:
            # From the version's own artifact location: a models:/ URI would be resolved
            # against the process's default registry, not tracking.uri (mlflow 3.17).
            location = client.get_model_version_download_uri(name, version)
            local = mlflow.artifacts.download_artifacts(location, dst_path=str(tmp),
                                                        tracking_uri=uri)  # fmt: skip
        except MlflowException as err:
            raise DataError(f"{setting}: downloading version {version} of {name!r} from "
                            f"tracking.uri={uri} failed: {err.message}") from err  # fmt: skip
        model_dir = str(Path(local).resolve().relative_to(Path(tmp).resolve()))
        record = {"model": name, "version": version, "logged_model": logged,
                  "tracking_uri": uri, "model_dir": model_dir}  # fmt: skip
        (tmp / CACHE_RECORD).write_text(json.dumps(record, indent=2))
    return out / model_dir


def from_config(cfg: DictConfig) -> Lineage | None:
    """`reference.source` of a composed config resolved (None when unset): against
    `tracking.uri`, cached under `paths.artifacts`."""
    source = OmegaConf.select(cfg, "reference.source")
    if source is None:
        return None
    if cfg.reference.ckpt is not None:  # the schema refuses it; a config built in code too
        raise DataError(f"reference.source={source} reference.ckpt={cfg.reference.ckpt}: set "
                        "one of them")  # fmt: skip
    return resolve(str(source), str(cfg.tracking.uri), Path(cfg.paths.artifacts) / CACHE_DIR)


def apply(cfg: DictConfig, lineage: Lineage | None) -> DictConfig:
    """A stage's config trained from `lineage`'s checkpoint (reference.ckpt set,
    reference.source cleared, the lineage tags for the stage's MLflow run in tracking.tags);
    `cfg` itself when there is none."""
    if lineage is None:
        return cfg
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.reference.ckpt = lineage.ckpt
        out.reference.source = None
        out.tracking.tags = lineage.tags()
    return out
