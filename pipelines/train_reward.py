"""`python pipelines/train_reward.py [overrides]` from a checkout is `recsys-dpo train-reward [overrides]`
(recsys_dpo/commands/train_reward.py)."""

from recsys_dpo.commands.train_reward import main

if __name__ == "__main__":
    main()
