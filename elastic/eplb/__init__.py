"""Expert-parallel load balancing (EPLB): where each logical expert's replicas live."""
from elastic.eplb.policy import balancedness, count_moved_slots, rebalance_experts, should_rebalance
from elastic.eplb.reference import rebalance_experts_reference

__all__ = ["balancedness", "count_moved_slots", "rebalance_experts", "rebalance_experts_reference",
           "should_rebalance"]
