"""Redis key and channel names, and the chat -> partition mapping.

Every name carries the configured prefix. Per-partition keys carry a Redis Cluster
hash tag (``{p3}``) so a partition's stream and lease live on one shard.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

CONSUMER_GROUP = "workers"


def partition_of(chat_id: str, partitions: int) -> int:
    """Stable partition of a chat: CRC-32 of its id, the same in every process and version."""
    return zlib.crc32(chat_id.encode()) % partitions


@dataclass(frozen=True, slots=True)
class Keys:
    """Names for one deployment (one prefix)."""

    prefix: str

    def stream(self, partition: int) -> str:
        """The request stream of a partition (gateways XADD, workers XREADGROUP)."""
        return f"{self.prefix}:stream:{{p{partition}}}"

    def lease(self, partition: int) -> str:
        """The ownership lease of a partition (value: the owning worker's node id)."""
        return f"{self.prefix}:lease:{{p{partition}}}"

    def node_channel(self, node_id: str) -> str:
        """Pub/sub channel of one gateway node: direct replies to its sockets."""
        return f"{self.prefix}:node:{node_id}"

    def chat_channel(self, chat_id: str) -> str:
        """Pub/sub channel of one chat: live pushes of stored messages."""
        return f"{self.prefix}:room:{chat_id}"

    @property
    def control_channel(self) -> str:
        """Pub/sub channel every gateway (and worker) listens on: access that ended."""
        return f"{self.prefix}:control"

    def chat_from_channel(self, channel: str) -> str | None:
        """The chat id of a chat channel name, or None for any other channel."""
        head = f"{self.prefix}:room:"
        return channel[len(head) :] if channel.startswith(head) else None

    @property
    def workers(self) -> str:
        """Sorted set of live workers (score: last heartbeat, unix seconds)."""
        return f"{self.prefix}:workers"

    @property
    def worker_connections(self) -> str:
        """Hash of workers' presence connections (node id -> Redis client id)."""
        return f"{self.prefix}:worker-connections"

    def stream_partition(self, stream: str) -> int:
        """Partition number of a stream key made by :meth:`stream`."""
        return int(stream.rsplit("{p", 1)[1].rstrip("}"))
