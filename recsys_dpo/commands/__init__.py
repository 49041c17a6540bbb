"""The stage entry points, one module per `recsys-dpo` command (recsys_dpo/cli.py). Each has

- `CONFIG`, the name of its primary config in the packaged configs (`CONF`);
- `run(cfg)`, the stage on a composed config: what it wrote, DataError on bad input
  (`recsys_dpo.api` calls it with a config composed by hydra's compose API);
- `main`, its hydra app: the config composed from the command line, bad input one message and
  exit status 2 (`recsys-dpo <command>` and `python pipelines/<stage>.py` run it).
"""

# The packaged configs (recsys_dpo/conf/): found by import, so every entry point runs from any
# directory. Users add configs of their own with hydra's --config-dir (README, "Your own configs").
CONF = "pkg://recsys_dpo.conf"
