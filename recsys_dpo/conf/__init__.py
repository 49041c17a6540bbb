"""The hydra configs, shipped with the package: every entry point composes them as
`pkg://recsys_dpo.conf`, so the tool runs from any directory."""
