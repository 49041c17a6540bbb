"""`python pipelines/evaluate.py [overrides]` from a checkout is `recsys-dpo evaluate [overrides]`
(recsys_dpo/commands/evaluate.py)."""

from recsys_dpo.commands.evaluate import main

if __name__ == "__main__":
    main()
