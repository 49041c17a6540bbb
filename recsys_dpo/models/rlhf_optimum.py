"""The RLHF optimum served as it is: pi*(i|u) ∝ pi_ref(i|u) exp(r(u, i) / beta), no training.

Its scores are s*(u, i) = s_ref(u, i) + r(u, i) / beta (`objectives.rlhf.rlhf_optimum_logits`;
the log-partitions are per-user constants, so they rank and softmax the same). Both models
score by inner products, so s* is one too:

    u* = [u_ref, u_r / beta],   v*_i = [v_ref_i, v_r_i],   <u*, v*_i> = s_ref + r / beta

and the concatenated vectors go through the same faiss retrieval, evaluation and exact KL as
any model: `RLHFOptimum(reference, reward, beta)` is a `Recommender` whose catalog is the
reference's. The RLHF route's `rlhf_exact` distils this policy into one network of the
reference's size; this is the policy it targets, served at twice the vector width.

A model of two others: its `config` names both (registry name and constructor kwargs), so
`RLHFOptimum(**model.config)` rebuilds it and `load_state_dict` loads both sets of weights.
"""

from typing import Any

import torch
from torch import Tensor

from recsys_dpo.models.base import Batch, Recommender


class RLHFOptimum(Recommender):
    """s_ref + r / beta as one inner-product model (module docstring).

    Args:
        reference, reward: `{"name": <registry name>, "config": <constructor kwargs>}` of the
            frozen reference and the reward model (`recsys-dpo train-reward`: the reference's
            architecture), or the models themselves.
        beta: the KL coefficient, > 0.
        max_len: the context length batches are cut to, as every model's config has it (the
            evaluator and the export read it); by default the reference's.
        n_items, n_users: the catalog and user-table sizes, as every model's config has them
            (the evaluator checks them against the data); the reference's, which these must
            equal when given (they are when the model is rebuilt from its config).
    """

    name = "rlhf_optimum"

    def __init__(self, reference: dict[str, Any] | Recommender,
                 reward: dict[str, Any] | Recommender, beta: float,
                 max_len: int | None = None, n_items: int | None = None,
                 n_users: int | None = None) -> None:  # fmt: skip
        super().__init__()
        from recsys_dpo.models import build_model  # the registry imports this module

        if beta <= 0:
            raise ValueError(f"RLHFOptimum: beta must be > 0, got {beta}")
        parts = {}
        for key, part in (("reference", reference), ("reward", reward)):
            model = part if isinstance(part, Recommender) else build_model(part["name"],
                                                                           **part["config"])  # fmt: skip
            parts[key] = model
        if parts["reference"].n_items != parts["reward"].n_items:
            raise ValueError(f"RLHFOptimum: the reference scores {parts['reference'].n_items} "
                             f"items, the reward model {parts['reward'].n_items}")  # fmt: skip
        self.reference, self.reward = parts["reference"], parts["reward"]
        self.beta = float(beta)
        self.n_items = self.reference.n_items
        self.config = {key: {"name": m.name, "config": m.config} for key, m in parts.items()}
        self.config |= {"beta": self.beta,
                        "max_len": self.reference.config.get("max_len") if max_len is None
                        else max_len}  # fmt: skip
        for key, given in (("n_items", n_items), ("n_users", n_users)):
            own = self.reference.config.get(key)
            if given is not None and given != own:
                raise ValueError(f"RLHFOptimum: {key}={given}, but the reference has {own}")
            if own is not None:
                self.config[key] = own

    @property
    def embeds_user_ids(self) -> bool:
        return self.reference.embeds_user_ids or self.reward.embeds_user_ids

    def user_embeddings(self, batch: Batch) -> Tensor:
        """[u_ref, u_r / beta] [B, d_ref + d_r]."""
        return torch.cat([self.reference.user_embeddings(batch),
                          self.reward.user_embeddings(batch) / self.beta], dim=-1)  # fmt: skip

    def _item_vectors(self, items: Tensor) -> Tensor:
        """[v_ref_i, v_r_i] [..., d_ref + d_r]."""
        return torch.cat([self.reference.embed_items(items), self.reward.embed_items(items)],
                         dim=-1)  # fmt: skip
