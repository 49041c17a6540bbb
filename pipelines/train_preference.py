"""`python pipelines/train_preference.py [overrides]` from a checkout is `recsys-dpo train-preference [overrides]`
(recsys_dpo/commands/train_preference.py)."""

from recsys_dpo.commands.train_preference import main

if __name__ == "__main__":
    main()
