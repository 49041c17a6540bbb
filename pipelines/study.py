"""`python pipelines/study.py [overrides]` from a checkout is `recsys-dpo study [overrides]`
(recsys_dpo/commands/study.py)."""

from recsys_dpo.commands.study import main

if __name__ == "__main__":
    main()
