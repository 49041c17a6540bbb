"""The RLHF route in the preference stage: `train-preference objective=rlhf_exact|rlhf_pg|rloo
reward.ckpt=<train-reward checkpoint>` on the tiny exposure-biased synthetic log of
test_reward, checked against the closed forms of `recsys_dpo.objectives.rlhf` on the train
pairs' contexts (the events DPO trains on)."""

from pathlib import Path

import mlflow
import pytest
import torch
from conftest import bad_input_message, run_pipeline
from test_reward import REWARD, biased  # noqa: F401  (biased: the module's fixture)
from test_train_cli import BIASED, config, result

from recsys_dpo.commands import train_preference as train_preference_command
from recsys_dpo.errors import DataError
from recsys_dpo.objectives.catalog import exact_kl
from recsys_dpo.objectives.rlhf import rlhf_objective, rlhf_optimum_logits
from recsys_dpo.training.reference_module import load_model, read_checkpoint
from recsys_dpo.training.run import preference_pairs, run_dir, train_preference, train_reward

# A short policy run: two epochs at a large learning rate.
POLICY = ("model=two_tower", "trainer.max_epochs=2", "train.batch_size=64", "train.lr=1e-2",
          "progress=false", "tracking.enabled=false")  # fmt: skip


@pytest.fixture(scope="module")
def reward(biased) -> tuple[Path, Path, Path]:  # noqa: F811
    """(artifacts, reference checkpoint, reward checkpoint) on the biased log."""
    root, reference = biased
    run = train_reward(config("train_reward", root, f"reference.ckpt={reference}", *BIASED,
                              *REWARD[:1], "trainer.max_epochs=2", *REWARD[2:]))  # fmt: skip
    return root, reference, Path(result(run)["best_ckpt"])


def rlhf_config(reward: tuple[Path, Path, Path], objective: str, *overrides: str):
    root, reference, reward_ckpt = reward
    return config("config", root, f"reference.ckpt={reference}", f"reward.ckpt={reward_ckpt}",
                  f"objective={objective}", *BIASED, *POLICY, *overrides)  # fmt: skip


@torch.no_grad()
def train_logits(cfg, *ckpts: str | Path) -> list[torch.Tensor]:
    """Each checkpoint's catalog logits on the contexts of the train pairs."""
    data, _, _ = preference_pairs(cfg)
    data.setup()
    batch = data.train_set.__getitems__(list(range(len(data.train_set))))
    return [load_model(ckpt).full_scores(batch) for ckpt in ckpts]


def test_rlhf_exact_distils_the_closed_form_optimum(reward):
    beta = 0.5
    cfg = rlhf_config(reward, "rlhf_exact", f"objective.beta={beta}")
    run = train_preference(cfg)
    assert run.name.startswith("two_tower-rlhf_exact-")
    _, reference, reward_ckpt = reward
    ref, r, policy = train_logits(cfg, reference, reward_ckpt, result(run)["last_ckpt"])
    target = rlhf_optimum_logits(ref, r, beta)
    before, after = exact_kl(target, ref).mean().item(), exact_kl(target, policy).mean().item()
    print(f"KL(pi* || .) on the train contexts: reference {before:.4f}, policy {after:.4f}")
    assert after < 0.5 * before, (before, after)


def test_rlhf_pg_raises_the_exact_kl_regularised_reward(reward):
    beta = 0.5
    cfg = rlhf_config(reward, "rlhf_pg", f"objective.beta={beta}")
    run = train_preference(cfg)
    _, reference, reward_ckpt = reward
    ref, r, policy = train_logits(cfg, reference, reward_ckpt, result(run)["last_ckpt"])
    start = rlhf_objective(ref, ref, r, beta).rlhf_reward.mean().item()  # E_ref[r], KL 0
    reached = rlhf_objective(policy, ref, r, beta).rlhf_reward.mean().item()
    # The maximum, per context: beta * log E_ref[exp(r / beta)] (the value at pi*).
    real = slice(1, None)
    log_ref = torch.log_softmax(ref[:, real], dim=-1)
    best = (beta * torch.logsumexp(log_ref + r[:, real] / beta, dim=-1)).mean().item()
    print(f"E[r] - beta KL on the train contexts: reference {start:.4f}, policy {reached:.4f}, "
          f"optimum {best:.4f}")  # fmt: skip
    assert start < reached <= best + 1e-5, (start, reached, best)
    assert reached - start > 0.2 * (best - start), (start, reached, best)


def test_rloo_trains_and_logs_trls_names_and_the_exact_kl(reward, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = rlhf_config(reward, "rloo", "objective.k=4", "trainer.max_epochs=1",
                      "tracking.enabled=true", f"tracking.uri={uri}", "tracking.experiment=rl",
                      "trainer.log_every_n_steps=1", f"paths.runs={tmp_path}")  # fmt: skip
    result(train_preference(cfg))
    client = mlflow.MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("rl").experiment_id])
    assert run.data.params["objective/name"] == "rloo"
    names = {"loss", "objective/rlhf_reward", "objective/kl", "objective/entropy",
             "objective/scores", "kl/policy_ref", "val/objective/rlhf_reward", "val/ndcg_at_10"}  # fmt: skip
    assert names <= set(run.data.metrics), set(run.data.metrics)
    # objective/kl is exact over the catalog (not TRL's sampled estimate): kl/policy_ref.
    assert run.data.metrics["objective/kl"] == pytest.approx(run.data.metrics["kl/policy_ref"])
    assert run.data.metrics["kl/policy_ref"] > 0


def test_rloo_without_a_reward_model_exits_2_in_one_line(reward, tmp_path):
    root, reference, _ = reward
    done = run_pipeline("train_preference.py", f"paths.artifacts={root}",
                        f"reference.ckpt={reference}", "objective=rloo", *BIASED, *POLICY,
                        f"paths.runs={tmp_path}", cwd=tmp_path)  # fmt: skip
    message = bad_input_message(done)
    assert "objective=rloo optimises against a reward model: pass reward.ckpt=" in message
    assert not (tmp_path / "preference").exists()


def test_a_reward_model_of_another_vocabulary_or_for_dpo_is_refused(reward, tmp_path):
    root, _, reward_ckpt = reward
    saved = read_checkpoint(reward_ckpt)
    saved["dataset"]["vocab_hash"] = "0" * 16
    other = tmp_path / "other.ckpt"
    torch.save(saved, other)
    with pytest.raises(DataError, match=f"reward.ckpt={other}"):
        train_preference(rlhf_config((*reward[:2], other), "rlhf_pg"))
    dpo = config("config", root, f"reference.ckpt={reward[1]}", f"reward.ckpt={reward_ckpt}",
                 *BIASED, *POLICY, f"paths.runs={tmp_path}")  # fmt: skip
    with pytest.raises(DataError, match="objective=dpo: only the RLHF objectives .* read a"):
        train_preference_command.run(dpo)
    assert not (tmp_path / "preference").exists()


def test_an_unset_reward_ckpt_leaves_the_run_hashes_as_they_were(reward):
    """Runs trained before the key existed keep their directories (and caches)."""
    root, reference, _ = reward
    cfg = config("config", root, f"reference.ckpt={reference}", *BIASED, *POLICY)
    before = config("config", root, f"reference.ckpt={reference}", *BIASED, *POLICY, "~reward")
    assert "reward" not in before and run_dir(cfg, "preference", "x") == run_dir(
        before, "preference", "x"
    )
    rl = rlhf_config(reward, "rlhf_pg")
    assert run_dir(rl, "preference", "x") != run_dir(
        config("config", root, f"reference.ckpt={reference}", "objective=rlhf_pg", *BIASED,
               *POLICY, "reward.ckpt=elsewhere.ckpt"), "preference", "x"
    )  # fmt: skip
