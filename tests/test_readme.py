"""Every fenced bash block of README.md runs as written: in README order, in one working
directory outside the checkout (so a block can use what an earlier one wrote, as a reader
following the README would), with the package installed from a wheel of this checkout
(tests/conftest.py::installed) and nothing of the checkout importable.

Two departures, both listed here: `SMALL` is appended to every `recsys-dpo run` command (a
smaller model and one epoch per stage, to keep CI fast; the command is otherwise the README's),
and the commands in `SKIP` are not run, each for the reason given. A block with a command that
reads ../shared/data is skipped when the datasets are not there."""

import re
import shlex
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, SHARED_DATA, installed_env
from hydra.errors import HydraException
from omegaconf import OmegaConf

from recsys_dpo import api
from recsys_dpo.cli import COMMANDS

SMALL = ("data.max_len=10", "model.dim=16", "trainer.max_epochs=1",
         "pipeline.reference.max_epochs=1", "eval.n_resamples=100", "train.batch_size=128")  # fmt: skip

# Commands not run (matched by their start), each with its reason. Keep it short.
SKIP = {
    "pip install torch==2.13.0": "the `installed` fixture runs it first, pinned the same, to "
    "build the virtualenv every block runs in",
    "pip install .": "the `installed` fixture installs the wheel `pip wheel .` builds of this "
    "checkout",
    "make quickstart": "a second virtualenv inside the checkout (minutes); its steps are the "
    "fixture's install and the first `recsys-dpo run experiment=quickstart` block",
    "make test": "the test suite itself",
    "recsys-dpo study study=ml1m_sasrec study.jobs=2 study.publish": "the ML-1M study trains "
    "for hours (the line before it, its plan, runs)",
    "recsys-dpo study study=ml100k_sasrec": "trains the ML-1M study's recipes on ML-100k, "
    "about an hour",
    "recsys-dpo study study=ml100k_feedback": "3 ML-100k references and 27 fine-tuning runs, "
    "about 16 minutes on one core",
    "recsys-dpo study study=synthetic_impressions": "39 training runs, about 23 minutes on one "
    "core",
    "recsys-dpo study study=synthetic_negatives": "69 training runs, about 10 minutes on one "
    "core",
    "recsys-dpo study study=synthetic_rlhf_frontier": "57 training runs, about 7 minutes on "
    "one core",
    "recsys-dpo study study=ml1m_sasrec_rlhf_frontier": "3 ML-1M SASRec references, 3 reward "
    "models and 39 fine-tuning runs, about an hour on 2 cores",
}


def blocks() -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```$", (ROOT / "README.md").read_text(), re.S | re.M)


def logical_lines(block: str) -> list[str]:
    """The block's commands: continuation lines joined, a heredoc kept whole with its command."""
    out: list[str] = []
    lines = iter(block.splitlines())
    for line in lines:
        while line.endswith("\\"):
            line = line[:-1].rstrip() + " " + next(lines).strip()
        heredoc = re.search(r"<<'?(\w+)'?", line)
        if heredoc:
            body = []
            for text in lines:
                body.append(text)
                if text == heredoc.group(1):
                    break
            line = "\n".join([line, *body])
        out.append(line)
    return out


def skipped(command: str) -> str | None:
    return next((why for start, why in SKIP.items() if command.startswith(start)), None)


def with_small_data(command: str) -> str:
    """`recsys-dpo run ...` with SMALL appended before any trailing comment."""
    if not command.startswith("recsys-dpo run"):
        return command
    code, hash_, comment = command.partition("  #")
    return f"{code.rstrip()} {' '.join(SMALL)}" + (f"  {hash_}{comment}" if hash_ else "")


def reads_shared_data(command: str) -> bool:
    """Whether a recsys-dpo command's dataset is one of ../shared/data's (its composed config,
    uninterpolated, names paths.shared_data)."""
    words = shlex.split(command.split("\n")[0], comments=True)
    if len(words) < 2 or words[0] != "recsys-dpo" or words[1] not in COMMANDS:
        return False
    overrides = [w for w in words[2:] if "=" in w and not w.startswith("-")]
    try:
        cfg = api.config(COMMANDS[words[1]][0], overrides)
    except HydraException:  # a config of the README's own directory (--config-dir)
        return False
    return "${paths.shared_data}" in OmegaConf.to_yaml(cfg.data)


def script(block: str) -> tuple[str, list[str]]:
    """(the block as run, the commands left out with their reasons)."""
    lines, left_out = [], []
    for command in logical_lines(block):
        why = skipped(command)
        if why is None:
            lines.append(with_small_data(command))
        else:
            left_out.append(f"{command.splitlines()[0]}: {why}")
    return "\n".join(lines) + "\n", left_out


# What a block's command leaves in the working directory, as the README says.
WRITES = {
    "recsys-dpo run experiment=quickstart": "artifacts/bundles/*/MODEL_CARD.md",
    "recsys-dpo prepare data=table data.name=clicks": "artifacts/prepared/clicks/manifest.json",
    "recsys-dpo run --config-dir conf": "artifacts/bundles/*/manifest.json",
    "recsys-dpo run -m": "multirun/*/*/summary.md",
}
BLOCKS = blocks()


def block_id(block: str) -> str:
    first = next(c for c in logical_lines(block) if not c.startswith("#"))
    return first.split("\n")[0][:50]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("reader")
    assert ROOT not in work.parents
    return work


def test_every_skipped_command_is_still_in_the_readme():
    commands = [c for block in BLOCKS for c in logical_lines(block)]
    for start in SKIP:
        assert any(c.startswith(start) for c in commands), f"SKIP names a gone command: {start}"


@pytest.mark.parametrize("block", BLOCKS, ids=map(block_id, BLOCKS))
def test_readme_block_runs(block, installed, workdir):
    text, left_out = script(block)
    commands = [c for c in logical_lines(block) if skipped(c) is None]
    if not SHARED_DATA.exists() and any(reads_shared_data(c) for c in commands):
        pytest.skip(f"{SHARED_DATA} not present")
    if not text.strip("\n"):
        pytest.skip("; ".join(left_out))
    done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", text], cwd=workdir,
                          env=installed_env(installed), capture_output=True, text=True,
                          timeout=1200)  # fmt: skip
    assert done.returncode == 0, (text, done.stdout[-3000:], done.stderr[-5000:])
    assert "Traceback" not in done.stderr, done.stderr[-5000:]
    for command in commands:
        for start, pattern in WRITES.items():
            if command.startswith(start):
                assert list(workdir.glob(pattern)), (command, pattern)
