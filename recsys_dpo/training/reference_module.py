"""Stage 1: train the reference ranker (two-tower or SASRec) with a next-item loss.

The module only wires a model (`recsys_dpo.models.build_model`) to a loss of
`recsys_dpo.objectives.reference`; the maths lives there. SASRec batches with `targets_seq`
are trained at every position of the window (Kang & McAuley, ICDM 2018); others predict one
`target` from the user at their context.

Every checkpoint also carries a `"model"` entry (registry name, constructor config and the
prefix of its weights in `state_dict`), so `load_model` rebuilds the recommender of any stage's
checkpoint without the LightningModule class, and always with `torch.load(weights_only=True)`.
The compute-matched control is this same module started from a reference checkpoint
(`init_from`) and trained further with its own loss.

A checkpoint also records the prepared dataset it was trained on (`"dataset"`: `trained_on`),
and every consumer checks that record's vocabulary hash against the data it uses it with
(`check_vocab`), so a model is never silently used where its indices mean other items.

A growing catalog: data whose vocabulary extends the checkpoint's (`data.base_vocab`: the same
ids at the same indices, new items and users appended) is accepted, and the model is grown to
it as it is loaded (`weights_for`: `Recommender.grow_state`, each new row of an id table the
mean of the known rows, a two-tower's new attribute rows the data's own). Every stage loads
its checkpoints through `weights_for`, so the reference, the policy started from it, the
reward model and the evaluated models all grow the same way, and a new item has a defined
reference score (e.g. MF: s(u, new) = <p_u, mean q> + mean b). A checkpoint written from the
grown model (the policy, the reward model, mode=continue) records the data it trained on,
hence the NEW vocabulary and sizes.
"""

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from recsys_dpo.artifacts import content_hash
from recsys_dpo.data.datamodule import PreparedDataset, load_prepared
from recsys_dpo.data.schema import PAD_ITEM
from recsys_dpo.data.vocab import Vocab, check_extends
from recsys_dpo.errors import DataError
from recsys_dpo.models import MODELS, Recommender, build_model
from recsys_dpo.models.base import Batch
from recsys_dpo.objectives import reference as losses
from recsys_dpo.training.guards import require_finite, stage_guard
from recsys_dpo.training.ranking_eval import ranking_metrics
from recsys_dpo.training.schedule import check_schedule, configure_optimizer

REFERENCE_LOSSES = ("ce", "sampled_softmax", "bce", "gbce", "bpr", "rating_bce")


def read_checkpoint(path: str | Path, what: str | None = None) -> dict[str, Any]:
    """A recsys_dpo checkpoint loaded safely (tensors and plain data only) onto the CPU.

    The one loader of every checkpoint (stage inputs, Lightning's resume): a missing, empty,
    truncated or foreign file raises DataError naming `what` (the setting and path, e.g.
    "reference.ckpt=<path>"; by default the path), whatever torch.load's own exception would
    have been (EOFError, UnpicklingError, RuntimeError, OSError...).
    """
    path = Path(path)
    what = what or str(path)
    if not path.is_file():
        raise DataError(f"{what}: the checkpoint file does not exist")
    if path.stat().st_size == 0:
        raise DataError(f"{what}: not a recsys_dpo checkpoint (empty file)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load has no exception type of its own for a bad file
        raise DataError(
            f"{what}: not a recsys_dpo checkpoint (truncated, corrupt or not a torch file: "
            f"{type(err).__name__})"
        ) from err
    if not (isinstance(checkpoint, dict) and {"state_dict", "model"} <= checkpoint.keys()):
        raise DataError(
            f"{what}: not a recsys_dpo checkpoint (a torch file without the 'state_dict' and "
            "'model' entries the training stages write)"
        )
    return checkpoint


def model_spec(model: Recommender, prefix: str) -> dict[str, Any]:
    """What `load_model` needs: registry name, constructor config, weight-key prefix."""
    return {"name": model.name, "config": dict(model.config), "prefix": prefix}


def model_weights(checkpoint: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(spec, the recommender's own state_dict) from a checkpoint written by either module."""
    if "model" not in checkpoint:
        raise ValueError("checkpoint has no 'model' entry: it was not written by recsys_dpo")
    spec = checkpoint["model"]
    prefix = spec["prefix"]
    state = {
        k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)
    }
    return spec, state


def trained_on(data: PreparedDataset) -> dict[str, str]:
    """What a checkpoint records of the prepared dataset it is trained on (its `"dataset"`
    entry): the vocabulary hash that consumers check, the dataset's content hash and the
    directory, for the messages."""
    if "vocab_hash" not in data.manifest:
        raise DataError(
            f"{data.path}/manifest.json has no vocab_hash (prepared by an older version), so "
            "no checkpoint can be checked against it: re-run the prepare stage"
        )
    return {
        "vocab_hash": data.manifest["vocab_hash"],
        "dataset_hash": content_hash(data.manifest),
        "path": str(data.path),
    }


def check_vocab(
    checkpoint: Mapping[str, Any], data: Mapping[str, str], what: str
) -> Vocab | None:
    """Refuse the checkpoint `what` (its setting and path) unless it was trained on the
    vocabulary of `data` (`trained_on` of the dataset it is used with) or on a prefix of it
    (`check_extends`). One without the record, written before checkpoints carried it, cannot
    be checked and is refused too. Returns None for its own vocabulary, the data's vocabulary
    when that extends it (the model must grow to it, `weights_for`)."""
    record = checkpoint.get("dataset")
    if record is None:
        raise DataError(
            f"{what} has no vocabulary hash (written by an older version of recsys_dpo, or "
            "not by its training stages), so nothing says which items and users its indices "
            f"mean: re-train it on {data['path']}"
        )
    if record["vocab_hash"] == data["vocab_hash"]:
        return None
    vocab = Vocab.load(data["path"])
    config = checkpoint["model"]["config"]
    check_extends(
        record["vocab_hash"],
        (int(config["n_items"]), int(config["n_users"])),
        vocab,
        f"{what} (trained on {record['path']}, dataset hash {record['dataset_hash']}; used "
        f"with {data['path']}, dataset hash {data['dataset_hash']})",
        trained=_own_vocab(record),
    )
    return vocab


def _own_vocab(record: Mapping[str, str]) -> Vocab | None:
    """The vocabulary a checkpoint was trained on, when its dataset is still where it was
    and unchanged (its hash), to say what another one changed; else None."""
    try:
        vocab = Vocab.load(record["path"])
    except DataError:
        return None
    return vocab if vocab.content_hash() == record["vocab_hash"] else None


def weights_for(
    checkpoint: Mapping[str, Any], data: Mapping[str, str] | None, what: str
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(spec, state_dict) of the checkpoint's recommender (`model_weights`) for `data`
    (`trained_on` of the dataset it is used with; None: as stored, unchecked): checked
    (`check_vocab`), and, when the data's vocabulary extends the checkpoint's, grown to it
    (`Recommender.grow_state`; the spec's config then has the data's n_items and n_users, and
    a model with attribute buffers takes the new rows from the dataset's features)."""
    spec, state = model_weights(checkpoint)
    extended = None if data is None else check_vocab(checkpoint, data, what)
    if extended is None:
        return spec, state
    cls = MODELS[spec["name"]]
    attributes = None
    sides = {side for key, side in cls.attribute_rows.items() if key in state}
    if sides:
        dataset = load_prepared(data["path"])
        found = {side: dataset.features(side) for side in sides}
        if any(matrix is None for matrix in found.values()):
            raise DataError(
                f"{what} reads user and item attributes, and {data['path']} extends its "
                "vocabulary but has no features for the new ids: prepare it with data.features"
            )
        attributes = {side: torch.from_numpy(matrix) for side, matrix in found.items()}
    try:
        config, state = cls.grow_state(spec["config"], state, extended.n_items, extended.n_users,
                                       attributes)  # fmt: skip
    except ValueError as err:
        raise DataError(f"{what} grown to {data['path']}: {err}") from err
    return {**spec, "config": config}, state


def check_sizes(spec: dict[str, Any], what: str, **sizes: int) -> None:
    """Refuse a model built for other vocab sizes (n_items=..., n_users=...) than the data's:
    its item and user indices would mean other items and users."""
    for name, expected in sizes.items():
        if spec["config"].get(name) != expected:
            raise ValueError(
                f"{what} was trained with {name}={spec['config'].get(name)}, but the data has "
                f"{name}={expected}: train the reference on this prepared dataset"
            )


def load_model(
    path: str | Path,
    data: Mapping[str, str] | None = None,
    what: str | None = None,
    **config_overrides: Any,
) -> Recommender:
    """Rebuild the recommender stored in a checkpoint of either stage (eval mode, on CPU).

    data: `trained_on` of the dataset the model is for; the checkpoint is checked against it
    (`check_vocab`, naming it `what`, by default its path) and grown when the data's
    vocabulary extends its own (`weights_for`). config_overrides replace constructor kwargs
    that do not change the weights' shapes (e.g. dropout=0.0); one the model does not take
    (MF has no dropout) has nothing to replace and is left out.
    """
    checkpoint = read_checkpoint(path, what)
    spec, state = weights_for(checkpoint, data, what or str(path))
    config = spec["config"]
    overrides = {k: v for k, v in config_overrides.items() if k in config}
    model = build_model(spec["name"], **{**config, **overrides})
    model.load_state_dict(state)
    return model.eval()


class ReferenceModule(LightningModule):
    """Stage-1 LightningModule.

    Args:
        model_name, model_cfg: registry name and constructor kwargs of the recommender
            (n_items / n_users come from the data and override model_cfg).
        loss: "ce" (full-catalog softmax), "sampled_softmax" (uniform negatives, logQ
            corrected), "bce", "gbce" (gSASRec, calibration `gbce_t`), "bpr", or "rating_bce"
            (a rating classifier: batches of rated items with a `liked` label, from
            `SequenceDataModule(rating_threshold=...)`; no negatives are sampled).
        num_negatives: uniformly sampled negatives per target for the sampled losses.
        lr, weight_decay: AdamW's; lr_schedule, warmup_steps: its learning rate per step
            (`recsys_dpo.training.schedule`; "constant", 0: lr throughout).
        init_from: a checkpoint of this module to start from (the compute-matched control),
            grown when the data's vocabulary extends its own (`weights_for`).
        k: cut-off of the validation HR@k / NDCG@k.
        dataset: `trained_on` of the prepared dataset it trains on, recorded in every
            checkpoint (without it the checkpoints are refused by the stages that use them);
            an `init_from` checkpoint is checked against it.
    """

    def __init__(
        self,
        model_name: str,
        model_cfg: dict[str, Any],
        n_items: int,
        n_users: int,
        loss: str = "ce",
        num_negatives: int = 100,
        gbce_t: float = 0.75,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        lr_schedule: str = "constant",
        warmup_steps: int = 0,
        init_from: str | None = None,
        k: int = 10,
        dataset: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        if loss not in REFERENCE_LOSSES:
            raise ValueError(f"unknown reference loss {loss!r}; expected one of {REFERENCE_LOSSES}")
        if loss not in ("ce", "rating_bce") and not 1 <= num_negatives <= n_items - 1:
            raise ValueError(
                f"num_negatives must be in [1, {n_items - 1}] (the real items), got {num_negatives}"
            )
        if lr <= 0 or weight_decay < 0:
            raise ValueError(f"need lr > 0 and weight_decay >= 0, got {lr}, {weight_decay}")
        check_schedule(lr_schedule, warmup_steps)
        self.save_hyperparameters()
        self.model = build_model(
            model_name, **{**model_cfg, "n_items": n_items, "n_users": n_users}
        )
        if init_from is not None:
            spec, state = weights_for(read_checkpoint(init_from), dataset,
                                      f"init_from {init_from}")  # fmt: skip
            if spec["config"] != self.model.config:
                raise ValueError(
                    f"init_from {init_from}: its model config {spec['config']} differs from "
                    f"this module's {self.model.config}"
                )
            self.model.load_state_dict(state)

    def queries(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Query vectors [M, d] and their next items [M]: every real position of a SASRec
        window when the batch has `targets_seq` (its windows packed, `SASRec.hidden_at`),
        else one per row."""
        if "targets_seq" in batch and hasattr(self.model, "hidden_at"):
            width = min(batch["context"].shape[1], self.model.max_len)
            targets = batch["targets_seq"][:, -width:]
            real = targets != PAD_ITEM
            return self.model.hidden_at(batch["context"][:, -width:], real), targets[real]
        return self.model.user_embeddings(batch), batch["target"]

    def sample_negatives(self, target: Tensor) -> Tensor:
        """Uniform negatives [M, K] over the real items 1..N-1 (torch's global RNG)."""
        shape = (target.shape[0], self.hparams.num_negatives)
        return torch.randint(PAD_ITEM + 1, self.hparams.n_items, shape, device=target.device)

    def reference_loss(self, batch: Batch) -> Tensor:
        """The configured stage-1 loss of a training batch."""
        query, target = self.queries(batch)
        name = self.hparams.loss
        if name == "ce":
            return losses.catalog_softmax_ce(query, self.model.item_embeddings(), target)
        if name == "rating_bce":
            if "liked" not in batch:
                raise ValueError("loss=rating_bce needs batches of rated items with a 'liked' "
                                 "label (SequenceDataModule(rating_threshold=...))")  # fmt: skip
            logits = (query * self.model.embed_items(target)).sum(-1)
            return losses.rating_bce(logits, batch["liked"])
        negatives = self.sample_negatives(target)
        pos = (query * self.model.embed_items(target)).sum(-1)
        neg = torch.einsum("md,mkd->mk", query, self.model.embed_items(negatives))
        if name == "sampled_softmax":
            # Uniform sampling: log q = -log(N - 1) for every item, positive included.
            log_q = -math.log(self.hparams.n_items - 1)
            return losses.sampled_softmax_logq(
                pos,
                neg,
                torch.full_like(pos, log_q),
                torch.full_like(neg, log_q),
                accidental_hits_mask=negatives == target.unsqueeze(1),
            )
        if name == "gbce":
            return losses.gbce(pos, neg, num_items=self.hparams.n_items - 1, t=self.hparams.gbce_t)
        return losses.bce(pos, neg) if name == "bce" else losses.bpr(pos, neg)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss = self.reference_loss(batch)
        with stage_guard(self, "reference"):
            require_finite(loss, "the loss")
        self.log("loss", loss, prog_bar=True, batch_size=len(batch["user_idx"]))
        return loss

    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        with stage_guard(self, "reference"):
            metrics = ranking_metrics(self.model, batch, self.hparams.k)
        self.log_dict(
            {name: v.mean() for name, v in metrics.items()},
            batch_size=len(batch["user_idx"]),
            add_dataloader_idx=False,
            prog_bar=True,
            # Under DDP each rank validates a shard: the best checkpoint needs the global mean.
            sync_dist=True,
        )

    def configure_optimizers(self) -> Any:
        return configure_optimizer(self, self.model.parameters())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["model"] = model_spec(self.model, "model.")
        if self.hparams.dataset is not None:
            checkpoint["dataset"] = dict(self.hparams.dataset)
