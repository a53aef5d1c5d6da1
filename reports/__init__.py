"""Run outputs (metrics files, evaluation JSON) -> PNG plots and a markdown report."""
