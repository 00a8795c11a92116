"""Shared by the distributed tests: the distributed code path of ``distributed.compare`` run in one process."""

from flowdiff.runs.distributed import Ranks


class AllWorkRank0(Ranks):
    """Rank 0 of 2 that does every run itself: every collective answers as if rank 1 had nothing."""

    def share(self, items):
        return list(items)

    def all_gather(self, obj):
        return [obj, []]

    def broadcast(self, obj):
        return obj

    def gather(self, obj):
        return [obj, {}]
