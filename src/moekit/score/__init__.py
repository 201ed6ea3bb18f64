"""Expert importance criteria (pure functions of a profile) and their registry."""

from moekit.score.criteria import CRITERIA, ExpertStats, check_set_weights, layer_stats, parse_set_weights

__all__ = ["CRITERIA", "ExpertStats", "check_set_weights", "layer_stats", "parse_set_weights"]
