"""`python pipelines/run.py [overrides]` from a checkout is `recsys-dpo run [overrides]`
(recsys_dpo/commands/run.py)."""

from recsys_dpo.commands.run import main

if __name__ == "__main__":
    main()
