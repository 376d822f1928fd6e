"""`dits study`: grids of ordinary training runs that rerun the paper's scaling experiments
(grid.py), run them (runner.py, sampling.py) and report on them from their files (report.py)."""
