"""Evaluation: trajectory, depth and map metrics; reports with plots."""
