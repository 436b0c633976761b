"""Analysis instruments: what the Engram memory does in a trained model (``engramlm analyze``).

gates (gate map), knockout (Engram suppressed / capacity-1 table, per token class), rows (row
usage, Zipf fit, exact collisions, loss by n-gram frequency), fired (rows read for one token),
lens (LogitLens KL and linear CKA), planner (table bytes, bandwidth and IOPS per tier).
Layering: analysis imports models/data/hashing/store, never train/infer/cli.
"""

from engramlm.analysis.lens import linear_cka
from engramlm.analysis.planner import PlanRequest, format_plan, plan

__all__ = ["PlanRequest", "format_plan", "linear_cka", "plan"]
