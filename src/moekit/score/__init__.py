"""Expert importance criteria (pure functions of a profile) and their registry."""

from moekit.score.criteria import (
    CRITERIA,
    Criterion,
    ExpertStats,
    check_set_weights,
    criterion,
    layer_stats,
    parse_set_weights,
)

__all__ = ["CRITERIA", "Criterion", "ExpertStats", "check_set_weights", "criterion", "layer_stats", "parse_set_weights"]
