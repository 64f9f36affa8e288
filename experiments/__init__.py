"""Experiment runners: `python -m experiments.run --config=NAME.py` (see configs/)."""
