"""Studies: a config of reference recipe, rows, grid and seeds, run as one command with
selection on valid, one test read-out, matched controls and CIs across references
(`recsys_dpo.study.runner.run_study`)."""
