"""Hyperparameter sweeps from one cache: the grid, the runs (local or dask), the results tables.
Open sweep.py first (run_sweep); grid.py says what a grid may hold.
"""
