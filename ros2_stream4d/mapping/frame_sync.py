"""Group frames of several cameras by approximate time, so one model step sequence sees one instant.

Like message_filters' ApproximateTime policy in spirit (not its code): each camera keeps a short queue of recent
frames; a group forms when every camera has a frame within ``slop`` seconds of the group's newest frame, taking
for each camera the frame closest to the pivot. Frames older than a formed group are dropped (counted), as are
frames that fall out of a full queue.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class ApproximateSync(Generic[T]):
    def __init__(self, num_cameras: int, slop_s: float, queue_size: int = 8):
        if num_cameras < 1:
            raise ValueError(f"num_cameras must be >= 1, got {num_cameras}")
        self.num_cameras = num_cameras
        self.slop_ns = int(round(slop_s * 1e9))
        self._queues: list[deque[tuple[int, T]]] = [deque(maxlen=queue_size) for _ in range(num_cameras)]
        self.dropped = 0

    def set_slop(self, slop_s: float) -> None:
        self.slop_ns = int(round(slop_s * 1e9))

    def clear(self) -> None:
        for q in self._queues:
            q.clear()

    def add(self, camera: int, stamp_ns: int, item: T) -> list[T] | None:
        """Queue one frame; the group (one item per camera, in camera order) when one is complete, else None."""
        q = self._queues[camera]
        if len(q) == q.maxlen:
            self.dropped += 1
        q.append((int(stamp_ns), item))
        if self.num_cameras == 1:
            q.popleft()
            return [item]
        return self._try_group()

    def _try_group(self) -> list[T] | None:
        if any(not q for q in self._queues):
            return None
        # pivot: the latest of the cameras' oldest frames; every camera needs a frame within slop of it
        pivot = max(q[0][0] for q in self._queues)
        picks: list[int] = []
        for q in self._queues:
            best = min(range(len(q)), key=lambda i: abs(q[i][0] - pivot))
            if abs(q[best][0] - pivot) > self.slop_ns:
                # this camera's frames near the pivot are missing: drop frames that can never match
                self._drop_older_than(pivot - self.slop_ns)
                return None
            picks.append(best)
        group = []
        for q, i in zip(self._queues, picks):
            for _ in range(i):  # older, unmatched frames of this camera
                q.popleft()
                self.dropped += 1
            group.append(q.popleft()[1])
        return group

    def _drop_older_than(self, stamp_ns: int) -> None:
        for q in self._queues:
            while len(q) > 1 and q[0][0] < stamp_ns:
                q.popleft()
                self.dropped += 1
