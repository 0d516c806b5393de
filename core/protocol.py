"""What node and coordinator agree on: error codes and phrases, reply keys.

Both sides import this module, so the coordinator never imports node code to know what a node
may send (docs/DESIGN.md, "Threat model and what crosses the wire").
"""

from __future__ import annotations

# Fixed error phrases a node may send; details stay in the node's own log.
ERRORS: dict[str, tuple[int, str]] = {
    "records": (4001, "records invalid"),
    "budget": (4002, "budget exhausted"),
    "ledger": (4003, "ledger unusable"),
    "config": (4004, "configuration invalid"),
    "internal": (4005, "node failure"),
    "limits": (4006, "request outside node limits or run plan"),
    "model": (4007, "global model refused"),
}

# Metric keys of replies.
NUM_EXAMPLES = "num-examples"
EPSILON = "epsilon"
NOISE_MULTIPLIER = "noise-multiplier"
SAMPLE_RATE = "sample-rate"
STEPS = "steps"
RELEASE_NOISE = "release-noise"
DEMAND = "demand"
# The 80 % interval and median of D_i (forecasting/intervals.py): post-processing of the same
# release as D_i. They share the `demand-` prefix with the per-group keys, so these three names
# can never be group names, and whoever sums a reply's groups must skip them.
DEMAND_LO = "demand-lo"
DEMAND_MEDIAN = "demand-median"
DEMAND_HI = "demand-hi"
DEMAND_INTERVAL = (DEMAND_LO, DEMAND_MEDIAN, DEMAND_HI)
HOSPITAL = "hospital"
QUERY_ANSWER = "query-answer-"


# The only values a SecAgg+ fit reply carries in plain text (besides Flower's status record).
PUBLIC_FIT_METRICS = (EPSILON, NOISE_MULTIPLIER, SAMPLE_RATE, STEPS)
FIT_STATUS_MESSAGE = "ok"


def demand_key(group: str) -> str:
    return f"{DEMAND}-{group}"
