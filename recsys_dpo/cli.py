"""The `recsys-dpo` console script: one subcommand per stage, the rest of the command line
handed to that stage's hydra app (overrides, -m, --cfg job, --help, --config-dir ...).

    recsys-dpo run experiment=quickstart
    recsys-dpo prepare data=ml1m_sas
    recsys-dpo train-preference --help

Only the chosen stage's module is imported, so an unknown command or the command list answers
at once.
"""

import importlib
import sys
from collections.abc import Sequence
from importlib.metadata import version

# command -> (module of recsys_dpo.commands, what it does)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("run", "every stage: prepare -> reference -> preference -> evaluate -> export"),
    "prepare": ("prepare", "click log -> prepared dataset with preference pairs"),
    "train-reference": ("train_reference", "train the reference ranker (stage 1)"),
    "train-preference": ("train_preference", "fine-tune a reference under a DPO-family loss"),
    "train-reward": ("train_reward", "fit a Bradley-Terry reward model to the pairs (RLHF)"),
    "evaluate": ("evaluate", "full-catalog evaluation, policy vs reference with CIs"),
    "export": ("export", "the A/B candidate bundle of an evaluated policy"),
    "study": ("study", "a study: grids selected on valid, test read once, matched controls"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return "\n".join([
        "usage: recsys-dpo <command> [hydra overrides and flags]", "", "commands:", *lines, "",
        "Each command takes the overrides and flags of a hydra app: key=value, -m (a sweep),",
        "--cfg job (print the config), --config-dir DIR (your own configs), --help.",
    ])  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if args else 2)
    if args[0] == "--version":
        print(f"recsys-dpo {version('recsys-dpo')}")
        return
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; the commands are {', '.join(COMMANDS)} "
              "(recsys-dpo --help)", file=sys.stderr)  # fmt: skip
        sys.exit(2)
    module = importlib.import_module(f"recsys_dpo.commands.{COMMANDS[command][0]}")
    # hydra parses sys.argv itself; argv[0] names the command in its --help.
    sys.argv = [f"recsys-dpo {command}", *rest]
    module.main()
