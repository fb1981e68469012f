"""The ready queue, leases and the events bus: one contract (``base``), two implementations."""

from server.queue.base import PRIORITY_SHIFT, Bus, Lease, Queue, ReadyItem
from server.queue.memory import MemoryQueue
from server.queue.redis import RedisBus, RedisQueue

__all__ = ["PRIORITY_SHIFT", "Bus", "Lease", "MemoryQueue", "Queue", "ReadyItem", "RedisBus", "RedisQueue"]
