"""`difftrain ui`: a local web app over the run folders under RUNS_DIR (docs/ui.md).

runs.py (which folders are runs, their status), metrics.py (metrics.jsonl for charts), sampling.py (sample jobs
on the code of `difftrain sample`), launcher.py (the training queue), app.py (routes and safety), static/ (the page).
"""
