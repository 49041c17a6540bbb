"""The online loop on the synthetic simulator: serve -> simulated clicks -> update, per round.

"RL explores, DPO learns from a fixed log", measured. The simulator is the synthetic log's
own click model (`recsys_dpo.data.synthetic`): P(click | u, i shown at p) = examine(p) *
sigmoid(c t(u, i) + c0), drawn as Bernoulli clicks from a seeded numpy Generator. Five
policies start from one reference pi_ref (an MF trained with full-catalog CE on the clicks of
the logged, fixed impression log) and are updated for R rounds; each DPO method has a matched
SFT control (the project's standard: the same data, steps, lr and start point, no preference
term):

- online DPO: each round, a seeded sample of users is served a slate of K items from the
  current policy (`serve="topk"`: its top-K; `"sample"`: a Plackett-Luce draw from pi_theta,
  by the Gumbel top-k trick), clicks are simulated on the slate, every clicked item becomes a
  pair row (chosen: the click; rejected: the same slate's shown-not-clicked items), the rows
  accumulate over rounds, and the policy takes `dpo_epochs` epochs of DPO on all of them
  against the FROZEN reference (iterative DPO with a fixed reference; Xiong et al. 2024,
  "Iterative Preference Learning from Human Feedback", arXiv:2312.11456).
- offline DPO: the same DPO updates on the FIXED logged impression pairs only, as many pair
  rows each round as online DPO has accumulated (a seeded shuffle of the log's rows; capped
  at what the log holds).
- online SFT, the matched control of online DPO: the same loop (the same round's users, its
  own policy serving its own slates by the same rule, its own simulated clicks, its own pair
  rows accumulated over rounds) but the update is `dpo_epochs` epochs of full-catalog
  cross-entropy on the rows' chosen (clicked) items, with no preference term and no
  reference: the same lr, batch size, epochs and start point. Its serving noise and clicks are
  common random numbers (its own generators, seeded as online DPO's), so in round 1, where both
  policies are the reference, it sees the very slates and clicks online DPO sees; later
  differences come from the update and from what each policy then serves. Online DPO minus
  online SFT is what the shown-not-clicked items (the DPO term) add on the same kind of data.
- offline SFT, the matched control of offline DPO: the same CE updates on the same fixed-log
  rows offline DPO trains on each round.
- RLOO: each round `rloo_steps` steps of `objectives.rlhf.rloo_loss` (KL penalty `rloo_beta`
  to the reference), each on a fresh seeded sample of users with `rloo_k` items drawn per
  user from pi_theta. The reward is the simulated click of the item shown alone at position 0:
  a Bernoulli draw of P(click | u, i, p=0), not its expectation, because an online system
  observes clicks, not probabilities (the expectation would give RLOO information no served
  impression carries). The draw is made per (user, catalog item) each step and looked up by
  `rloo_loss`'s samples, so an item drawn twice in one row shares one click (one exposure's
  outcome, counted twice in the budget: the accounting below is conservative for RLOO).

Budget (item exposures, the simulator's only currency): per round online DPO shows
users_per_round x K items; RLOO shows rloo_steps x users_per_step x rloo_k sampled items, and
users_per_step is set to make the two equal (`OnlineSettings` refuses sizes that do not
divide); online SFT shows the same users_per_round x K. The offline arms use no new
exposures: they are matched on pair rows instead.

After every round each policy's top-`eval_k` over the whole catalog (no seen filter: the
simulator's utility is static) is read out exactly on the truth over ALL users:
truth/utility_at_K and truth/ctr_at_K (`evaluation.truth.truth_metrics`, the list shown in
rank order), the exact expected true utility of the policy as a distribution,
truth/expected_utility = sum_i pi(i|u) t(u, i), and the exact kl/policy_ref = KL(pi || pi_ref) (`objectives.catalog.exact_kl`).

Item index convention: model item i (1..n_items) is the truth's item row i - 1; 0 is padding.
Runs on CPU; seeded end to end (numpy Generators keyed by (seed, stream), torch generators and
`torch.manual_seed(seed)` for the reference's initial weights).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import polars as pl
import torch
from torch import Tensor

from recsys_dpo.data.schema import PAD_ITEM
from recsys_dpo.data.synthetic import Truth
from recsys_dpo.evaluation.truth import truth_metrics
from recsys_dpo.models.mf import MF
from recsys_dpo.objectives.catalog import exact_kl
from recsys_dpo.objectives.preference import dpo
from recsys_dpo.objectives.reference import full_softmax_ce
from recsys_dpo.objectives.rlhf import rloo_loss

SERVE_RULES = ("topk", "sample")
METHODS = ("offline_dpo", "online_dpo", "rloo", "offline_sft", "online_sft")
ONLINE_METHODS = ("online_dpo", "online_sft")
# Independent random streams per purpose, so one method's draws never shift another's.
_REF_SHUFFLE, _ROUND_USERS, _CLICKS, _SERVE, _RLOO_USERS, _RLOO_REWARD, _RLOO_SAMPLE = range(7)
_OFFLINE_POOL = 8
# Minibatch order per method trained on pair rows (stream < 100: torch seeds are seed*100+stream).
_SHUFFLE = {"offline_dpo": 7, "online_dpo": 17, "offline_sft": 37, "online_sft": 47}


@dataclass(frozen=True)
class OnlineSettings:
    """Settings of `run_online` (module docstring)."""

    rounds: int = 4
    users_per_round: int = 500
    serve: str = "topk"
    dpo_beta: float = 1.0
    dpo_epochs: int = 3
    rloo_beta: float = 0.1
    rloo_k: int = 10
    rloo_steps: int = 5
    lr: float = 3e-3
    batch_size: int = 256
    reference_epochs: int = 5
    reference_lr: float = 1e-2
    dim: int = 17
    eval_k: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.serve not in SERVE_RULES:
            raise ValueError(f"online: serve={self.serve!r}; expected one of {SERVE_RULES}")
        positive = (
            "rounds",
            "users_per_round",
            "dpo_epochs",
            "rloo_steps",
            "batch_size",
            "reference_epochs",
            "eval_k",
            "lr",
            "reference_lr",
            "dpo_beta",
            "rloo_beta",
        )
        bad = [name for name in positive if not getattr(self, name) > 0]
        if bad:
            raise ValueError(f"online: {bad} must be > 0; got {asdict(self)}")
        if self.rloo_k < 2:
            raise ValueError(f"online: rloo_k={self.rloo_k} must be >= 2 (leave-one-out)")

    def rloo_users_per_step(self, slate_size: int) -> int:
        """Users per RLOO step that spend exactly online DPO's exposures per round."""
        budget = self.users_per_round * slate_size
        per_step = self.rloo_k * self.rloo_steps
        if budget % per_step:
            raise ValueError(
                f"online: users_per_round x slate_size = {budget} exposures per round is not a "
                f"multiple of rloo_k x rloo_steps = {per_step}; equal budgets need it to be"
            )
        return budget // per_step


@dataclass(frozen=True)
class Slates:
    """Served (or logged) slates: user row [S], items [S, K] (model item index), clicks."""

    users: np.ndarray
    items: np.ndarray
    clicked: np.ndarray  # [S, K] bool


@dataclass(frozen=True)
class PairRows:
    """One row per clicked item: the user, the click, the slate's shown-not-clicked items
    (padded with PAD_ITEM) and their mask."""

    users: np.ndarray  # [P]
    chosen: np.ndarray  # [P]
    rejected: np.ndarray  # [P, K - 1]
    mask: np.ndarray  # [P, K - 1] bool

    def __len__(self) -> int:
        return len(self.users)

    def take(self, rows: np.ndarray) -> PairRows:
        return PairRows(self.users[rows], self.chosen[rows], self.rejected[rows], self.mask[rows])

    @staticmethod
    def concat(parts: list[PairRows]) -> PairRows:
        return PairRows(*(np.concatenate([getattr(p, f) for p in parts])
                          for f in ("users", "chosen", "rejected", "mask")))  # fmt: skip


def simulate_clicks(
    truth: Truth, users: np.ndarray, items: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Bernoulli clicks [S, K] on slates `items` (model item index) shown in order to `users`
    [S]: click[s, p] ~ Bernoulli(truth.click_probability(user, item, position p))."""
    p = truth.click_probability(users[:, None], items - 1, np.arange(items.shape[1])[None, :])
    return rng.random(p.shape) < p


def impression_pairs(slates: Slates) -> PairRows:
    """Per clicked item of each slate: chosen = the click, rejected = the same slate's
    shown-not-clicked items (the impression pairs of the synthetic study)."""
    slate_row, position = np.nonzero(slates.clicked)
    unclicked = ~slates.clicked[slate_row]
    # Not-clicked items first (stable), so each row's rejected items are left-aligned.
    order = np.argsort(~unclicked, axis=1, kind="stable")[:, :-1]
    mask = np.take_along_axis(unclicked, order, axis=1)
    rejected = np.where(mask, np.take_along_axis(slates.items[slate_row], order, axis=1), PAD_ITEM)
    return PairRows(slates.users[slate_row], slates.items[slate_row, position], rejected, mask)


def logged_slates(events: pl.DataFrame, truth: Truth) -> Slates:
    """The fixed impression log (`synthetic.simulate`'s events) as slates in display order."""
    k = truth.config.slate_size
    frame = events.sort(["request_id", "position"])
    users = np.array([truth.user_index[u] for u in frame["user_id"][::k]], dtype=np.int64)
    items = np.array([truth.item_index[i] + 1 for i in frame["item_id"]], dtype=np.int64)
    return Slates(users, items.reshape(-1, k), frame["clicked"].to_numpy().reshape(-1, k))


def _batch(users: np.ndarray | Tensor) -> dict[str, Tensor]:
    return {"user_idx": torch.as_tensor(users, dtype=torch.long)}


def all_scores(model: MF, n_users: int) -> Tensor:
    """Catalog logits [n_users, n_items + 1] of every user (column 0: -inf)."""
    with torch.no_grad():
        return model.full_scores(_batch(np.arange(n_users)))


def serve(scores: Tensor, k: int, rule: str, generator: torch.Generator) -> np.ndarray:
    """Slates [B, k] of model item indices from catalog logits [B, N]: the top-k, or a
    Plackett-Luce draw without replacement from softmax(scores) (Gumbel top-k: argtop_k of
    s + G, G ~ Gumbel(0, 1), Kool et al. 2019) in draw order."""
    if rule == "sample":
        uniform = torch.rand(scores.shape, generator=generator, dtype=scores.dtype)
        scores = scores - torch.log(-torch.log(uniform.clamp_min(1e-20)))
    return torch.topk(scores, k, dim=-1).indices.numpy()


def truth_readout(truth: Truth, scores: Tensor, ref_scores: Tensor, k: int) -> dict[str, float]:
    """Means over users of truth/utility_at_k and truth/ctr_at_k of the top-k of `scores`
    [U, N] (user rows 0..U-1), of truth/expected_utility = sum_i pi(i|u) t(u, i) (the policy
    as a distribution, what the RLHF objective moves) and of the exact kl/policy_ref to
    `ref_scores`."""
    users = np.arange(scores.shape[0])
    top = torch.topk(scores, k, dim=-1).indices.numpy()
    utility = truth.utility(users[:, None], np.arange(scores.shape[1] - 1)[None, :])
    ideal = -np.sort(-utility, axis=1)[:, :k]
    ranked = np.take_along_axis(utility, top - 1, axis=1)
    click = truth.click_probability(users[:, None], top - 1, np.arange(k)[None, :])
    metrics = truth_metrics(ranked, click, ideal, [k])
    out = {name: float(value.mean()) for name, value in metrics.items()}
    pi = torch.softmax(scores[:, PAD_ITEM + 1 :].double(), dim=-1).numpy()
    out["truth/expected_utility"] = float((pi * utility).sum(axis=1).mean())
    out["kl/policy_ref"] = float(exact_kl(scores, ref_scores).mean())
    return out


def train_reference(truth: Truth, logged: Slates, settings: OnlineSettings) -> MF:
    """pi_ref: MF (user ids) trained with full-catalog CE on the log's (user, clicked item)."""
    torch.manual_seed(settings.seed)
    model = MF(truth.config.n_items + 1, truth.config.n_users, dim=settings.dim)
    slate_row, position = np.nonzero(logged.clicked)
    users = torch.as_tensor(logged.users[slate_row])
    items = torch.as_tensor(logged.items[slate_row, position])
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.reference_lr)
    generator = torch.Generator().manual_seed(settings.seed * 100 + _REF_SHUFFLE)
    for _ in range(settings.reference_epochs):
        for rows in torch.randperm(len(users), generator=generator).split(settings.batch_size):
            loss = full_softmax_ce(model.full_scores(_batch(users[rows])), items[rows])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return model.eval()


class Policy:
    """A trainable copy of the reference with its own optimiser (kept across rounds)."""

    def __init__(self, reference: MF, lr: float) -> None:
        self.model = copy.deepcopy(reference).train()
        for p in self.model.parameters():
            p.requires_grad_(True)  # the reference copied is frozen
        self.optimiser = torch.optim.Adam(self.model.parameters(), lr=lr)

    def step(self, loss: Tensor) -> None:
        self.optimiser.zero_grad()
        loss.backward()
        self.optimiser.step()


def _minibatches(n: int, settings: OnlineSettings, generator: torch.Generator) -> Iterator[Tensor]:
    """Row indices of `settings.dpo_epochs` shuffled epochs over n rows, batch by batch."""
    for _ in range(settings.dpo_epochs):
        yield from torch.randperm(n, generator=generator).split(settings.batch_size)


def dpo_epochs(
    policy: Policy,
    reference: MF,
    pairs: PairRows,
    settings: OnlineSettings,
    generator: torch.Generator,
) -> None:
    """`settings.dpo_epochs` epochs of minibatch DPO on `pairs` against the frozen reference."""
    users = torch.as_tensor(pairs.users)
    chosen = torch.as_tensor(pairs.chosen)
    rejected = torch.as_tensor(pairs.rejected)
    mask = torch.as_tensor(pairs.mask)
    for rows in _minibatches(len(users), settings, generator):
        batch = _batch(users[rows])
        # `score` (not full_scores) keeps padded negatives finite; dpo masks them out.
        items = torch.cat([chosen[rows, None], rejected[rows]], dim=1)
        policy_scores = policy.model.score(batch, items)
        with torch.no_grad():
            ref_scores = reference.score(batch, items)
        loss = dpo(
            policy_scores[:, 0],
            policy_scores[:, 1:],
            ref_scores[:, 0],
            ref_scores[:, 1:],
            mask[rows],
            beta=settings.dpo_beta,
        ).loss
        policy.step(loss)


def sft_epochs(
    policy: Policy, pairs: PairRows, settings: OnlineSettings, generator: torch.Generator
) -> None:
    """`dpo_epochs`' matched control: the same epochs and minibatches, the loss full-catalog CE
    on the rows' chosen items (the rejected items and the reference unused)."""
    users = torch.as_tensor(pairs.users)
    chosen = torch.as_tensor(pairs.chosen)
    for rows in _minibatches(len(users), settings, generator):
        policy.step(full_softmax_ce(policy.model.full_scores(_batch(users[rows])), chosen[rows]))


class OnlineArm:
    """An online method's policy with its own serving noise, clicks and pair rows so far."""

    def __init__(
        self, policy: Policy, serve_generator: torch.Generator, click_rng: np.random.Generator
    ) -> None:
        self.policy = policy
        self.serve_generator = serve_generator
        self.click_rng = click_rng
        self.parts: list[PairRows] = []

    def collect(self, truth: Truth, users: np.ndarray, rule: str) -> Slates:
        """Serve `users` a slate each from the current policy by `rule`, simulate the clicks
        and keep the slates' impression pairs (`pairs`)."""
        with torch.no_grad():
            scores = self.policy.model.full_scores(_batch(users))
        items = serve(scores, truth.config.slate_size, rule, self.serve_generator)
        slates = Slates(users, items, simulate_clicks(truth, users, items, self.click_rng))
        self.parts.append(impression_pairs(slates))
        return slates

    @property
    def pairs(self) -> PairRows:
        """Every pair row collected so far, in round order."""
        return PairRows.concat(self.parts)


def rloo_round(
    policy: Policy,
    reference: MF,
    truth: Truth,
    settings: OnlineSettings,
    rng_users: np.random.Generator,
    rng_reward: np.random.Generator,
    generator: torch.Generator,
) -> int:
    """One round of RLOO steps with simulated click rewards; returns the exposures used."""
    n_users, n_items = truth.config.n_users, truth.config.n_items
    per_step = settings.rloo_users_per_step(truth.config.slate_size)
    for _ in range(settings.rloo_steps):
        users = rng_users.choice(n_users, size=per_step, replace=False)
        p_top = truth.click_probability(users[:, None], np.arange(n_items)[None, :], 0)
        reward = np.zeros((per_step, n_items + 1))
        reward[:, 1:] = rng_reward.random(p_top.shape) < p_top
        batch = _batch(users)
        with torch.no_grad():
            ref_logits = reference.full_scores(batch)
        loss = rloo_loss(
            policy.model.full_scores(batch),
            ref_logits,
            torch.as_tensor(reward, dtype=torch.float32),
            settings.rloo_beta,
            settings.rloo_k,
            generator=generator,
        ).loss
        policy.step(loss)
    return settings.rloo_steps * per_step * settings.rloo_k


def run_online(
    truth: Truth,
    events: pl.DataFrame,
    settings: OnlineSettings,
    methods: tuple[str, ...] = METHODS,
) -> dict:
    """The loop of the module docstring for `methods` (a subset of METHODS with online_dpo, the
    arm the others are matched to; each method's rows are the same whichever others run).
    Returns {"settings", "reference": its read-out, "oracle_utility", "rounds": [one dict per
    (round, method), methods in METHODS order]} with, per row, round, method,
    truth/utility_at_K, truth/ctr_at_K, truth/utility_regret_at_K, truth/expected_utility,
    kl/policy_ref, exposures (new simulated item exposures that round), exposures_total,
    pair_rows (the pair-trained methods' training rows)."""
    if not set(methods) <= set(METHODS) or "online_dpo" not in methods:
        raise ValueError(
            f"online: methods={methods}; expected a subset of {METHODS} with online_dpo"
        )
    methods = tuple(m for m in METHODS if m in methods)
    cfg = truth.config
    k_slate, n_users = cfg.slate_size, cfg.n_users
    settings.rloo_users_per_step(k_slate)  # refuse unequal budgets before any work

    def rng(stream: int) -> np.random.Generator:
        return np.random.default_rng([settings.seed, stream])

    def torch_rng(stream: int) -> torch.Generator:
        return torch.Generator().manual_seed(settings.seed * 100 + stream)

    logged = logged_slates(events, truth)
    reference = train_reference(truth, logged, settings)
    for p in reference.parameters():
        p.requires_grad_(False)
    ref_scores = all_scores(reference, n_users)
    k = settings.eval_k
    oracle = truth.utility(np.arange(n_users)[:, None], np.arange(cfg.n_items)[None, :])
    result = {
        "settings": asdict(settings),
        "simulator": asdict(cfg),
        "reference": truth_readout(truth, ref_scores, ref_scores, k),
        "oracle_utility": float((-np.sort(-oracle, axis=1)[:, :k]).mean()),
        "rounds": [],
    }

    log_pairs = impression_pairs(logged)
    log_pairs = log_pairs.take(rng(_OFFLINE_POOL).permutation(len(log_pairs)))
    policies = {m: Policy(reference, settings.lr) for m in methods}
    # Online SFT's generators are seeded as online DPO's: common random numbers (docstring).
    arms = {m: OnlineArm(policies[m], torch_rng(_SERVE), rng(_CLICKS))
            for m in ONLINE_METHODS if m in methods}  # fmt: skip
    rng_round = rng(_ROUND_USERS)
    rng_rloo_users, rng_rloo_reward = rng(_RLOO_USERS), rng(_RLOO_REWARD)
    rloo_gen = torch_rng(_RLOO_SAMPLE)
    shuffle = {m: torch_rng(_SHUFFLE[m]) for m in methods if m in _SHUFFLE}
    totals = dict.fromkeys(methods, 0)

    def update(method: str, pairs: PairRows) -> None:
        if method.endswith("_sft"):
            sft_epochs(policies[method], pairs, settings, shuffle[method])
        else:
            dpo_epochs(policies[method], reference, pairs, settings, shuffle[method])

    for round_ in range(1, settings.rounds + 1):
        exposures, rows = dict.fromkeys(methods, 0), dict.fromkeys(methods, 0)
        # (a) Online: the same users, each arm serves from its own policy and learns from
        # everything it has collected so far.
        users = rng_round.choice(n_users, size=settings.users_per_round, replace=False)
        for method, arm in arms.items():
            exposures[method] = arm.collect(truth, users, settings.serve).items.size
            pairs = arm.pairs
            update(method, pairs)
            rows[method] = len(pairs)
        # Offline: as many fixed-log rows as online DPO has, the same updates.
        offline_pairs = log_pairs.take(np.arange(min(rows["online_dpo"], len(log_pairs))))
        for method in ("offline_dpo", "offline_sft"):
            if method in methods:
                update(method, offline_pairs)
                rows[method] = len(offline_pairs)
        # (b) RLOO with simulated click rewards, the same exposure budget.
        if "rloo" in methods:
            exposures["rloo"] = rloo_round(
                policies["rloo"],
                reference,
                truth,
                settings,
                rng_rloo_users,
                rng_rloo_reward,
                rloo_gen,
            )
        for method, policy in policies.items():
            totals[method] += exposures[method]
            readout = truth_readout(truth, all_scores(policy.model.eval(), n_users), ref_scores, k)
            policy.model.train()
            result["rounds"].append({
                "round": round_, "method": method, **readout, "exposures": exposures[method],
                "exposures_total": totals[method], "pair_rows": rows[method],
            })  # fmt: skip
    return result
