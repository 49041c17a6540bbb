"""The `recsys_dpo/conf/experiment/` presets: each composes, and sets only keys the base config has.

Hydra merges a preset into a plain (unstructured) config, so a misspelt key
(`reference.hard_negative: 16`) would be added silently and change nothing.
"""

from pathlib import Path

import pytest
from conftest import CONF
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

MISSING = object()
PRESETS = sorted((CONF / "experiment").glob("*.yaml"))


def leaves(tree: dict, prefix: str = "") -> list[str]:
    """Dotted paths of every non-dict value of a nested dict."""
    paths = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        paths += leaves(value, f"{path}.") if isinstance(value, dict) else [path]
    return paths


def unknown_keys(preset: dict, base: DictConfig) -> list[str]:
    """The preset's keys (dotted) that `base` does not have."""
    return [p for p in leaves(preset) if OmegaConf.select(base, p, default=MISSING) is MISSING]


def composed(tmp_path: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("run", overrides=[f"paths.artifacts={tmp_path}", *overrides])


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_sets_only_existing_keys(preset, tmp_path):
    body = OmegaConf.to_container(OmegaConf.load(preset))
    groups = [
        f"{group.removeprefix('override /')}={choice}"
        for entry in body.pop("defaults", [])
        if isinstance(entry, dict)
        for group, choice in entry.items()
    ]
    base = composed(tmp_path, *groups)
    with_preset = composed(tmp_path, f"experiment={preset.stem}")
    assert unknown_keys(body, base) == [], f"{preset.name} sets keys the base config lacks"
    preset_values = OmegaConf.create(body)
    for path in leaves(body):
        assert OmegaConf.select(with_preset, path) == OmegaConf.select(preset_values, path), path


def test_unknown_keys_finds_a_misspelt_key(tmp_path):
    base = composed(tmp_path, "model=sasrec")
    preset = {"reference": {"hard_negative": 16, "hard_negatives_skip": 10}, "model": {"dim": 8}}
    assert unknown_keys(preset, base) == ["reference.hard_negative"]
