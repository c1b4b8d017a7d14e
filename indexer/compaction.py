"""When segments are merged: a size-tiered policy, and `everything` for `seesay compact`.

Segments fall into tiers by their live rows (tier t holds FANOUT**t to FANOUT**(t+1) - 1
rows). As soon as a tier holds FANOUT segments they are merged into one, which lands a
tier up; a segment with at least DEAD_FRACTION of its rows deleted is rewritten alone.
So each vector is rewritten about once per tier it climbs (log_16 of the collection
over the commit size: 1.8 times at 1M items added 8,192 at a time), and a kind holds at
most FANOUT - 1 segments per tier (about 60 at 100M items). The policy's merges run in the
background of the add or delete that made them due (`indexer.merging`), off the write lock.
"""
from __future__ import annotations

from typing import Sequence

from indexer.store import KINDS, SegmentRow

FANOUT = 16
DEAD_FRACTION = 0.3


def tier(rows: int) -> int:
    """The tier of a segment with `rows` live rows."""
    t, size = 0, FANOUT
    while rows >= size:
        t, size = t + 1, size * FANOUT
    return t


def plan(segments: Sequence[SegmentRow], everything: bool = False) -> list[list[SegmentRow]]:
    """Groups of segments (each of one kind) to merge, each group into one new segment.

    `everything` merges all segments of a kind into one and drops every deleted row.
    """
    groups: list[list[SegmentRow]] = []
    for kind in KINDS:
        mine = [s for s in segments if s.kind == kind]
        if everything:
            if len(mine) > 1 or any(s.dead for s in mine):
                groups.append(mine)
            continue
        tiers: dict[int, list[SegmentRow]] = {}
        for segment in mine:
            tiers.setdefault(tier(segment.rows - segment.dead), []).append(segment)
        chosen: set[int] = set()
        for members in tiers.values():
            if len(members) >= FANOUT:
                groups.append(members)
                chosen.update(s.id for s in members)
        groups.extend([s] for s in mine if s.id not in chosen and s.dead and s.dead >= DEAD_FRACTION * s.rows)
    return groups
