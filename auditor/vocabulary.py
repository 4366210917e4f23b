"""The closed word lists that several stages read and write: what a flag can say, and which words name a side.

Diagnostics raise flags, the store checks them, the summary counts them, a suite's acceptance and ``--fail-on`` name
them; all of them take the lists from here, so a new flag type or side is added in one place.
"""

from __future__ import annotations

FLAG_TYPES = ("missing", "misplaced", "misinterpreted")
SEVERITIES = ("low", "medium", "high")
ANY_FLAG = "any"  # a gate or an acceptance limit over every flag type together
GATE_TYPES = FLAG_TYPES + (ANY_FLAG,)  # what ``--fail-on`` and a suite's ``max_flag_rate`` may name
SIDE_WORDS = ("left", "right", "top", "bottom")  # the words of a named position that put an object on a side
