"""Evaluation as µSAM reports it: metrics, interactive and automatic evaluation, the report."""
