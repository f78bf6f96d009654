"""Experiments: sweep cells and their runs (cells), batching them (batching), sweeps on processes or Ray
(sweep), suites (suite), tuning (tune, trials) and the results store (store)."""
