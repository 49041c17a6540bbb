"""`python pipelines/train_reference.py [overrides]` from a checkout is `recsys-dpo train-reference [overrides]`
(recsys_dpo/commands/train_reference.py)."""

from recsys_dpo.commands.train_reference import main

if __name__ == "__main__":
    main()
