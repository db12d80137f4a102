"""Evaluation: trajectory, depth and map metrics; reports with plots.

Modules, imports pointing one way (metrics <- bagio <- evaluate <- report): metrics (the numbers), bagio
(prediction bags read and written), evaluate (EvalResult from arrays or bags), report (markdown, PNG, JSON),
cli (`stream4d eval`).
"""
