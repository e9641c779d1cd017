"""Grids of runs (``rlrr bench``, ``--study``, ``rlrr sweep``): cells, the suites and their tables, the paper's
ablations, the per-task search, where cells run (launchers), and the published tables they are scored against."""
