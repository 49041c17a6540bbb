"""`python -m recsys_dpo <command> ...` is `recsys-dpo <command> ...`."""

from recsys_dpo.cli import main

if __name__ == "__main__":
    main()
