"""`python pipelines/prepare.py [overrides]` from a checkout is `recsys-dpo prepare [overrides]`
(recsys_dpo/commands/prepare.py)."""

from recsys_dpo.commands.prepare import main

if __name__ == "__main__":
    main()
