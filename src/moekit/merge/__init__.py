"""Expert merging: plans of groups of experts (``moekit.merge.groups``), their arithmetic
(``moekit.merge.combine``), and checkpoints with fewer experts on disk (``moekit.merge.apply``)."""

from moekit.merge.apply import MergeResult, merge_model, merge_to_checkpoint
from moekit.merge.groups import MERGE_PLAN_FORMAT, Group, Member, keep_of, parse_groups, singleton_groups

__all__ = ["MERGE_PLAN_FORMAT", "Group", "Member", "MergeResult", "keep_of", "merge_model", "merge_to_checkpoint",
           "parse_groups", "singleton_groups"]
