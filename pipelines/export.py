"""`python pipelines/export.py [overrides]` from a checkout is `recsys-dpo export [overrides]`
(recsys_dpo/commands/export.py)."""

from recsys_dpo.commands.export import main

if __name__ == "__main__":
    main()
