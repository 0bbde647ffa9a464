"""A channel layer with Redis's round trips: the in-memory layer, but every group change takes a while."""
from __future__ import annotations

import asyncio

from channels.layers import InMemoryChannelLayer


class SlowGroupsChannelLayer(InMemoryChannelLayer):
    delay = 0.2

    async def group_add(self, group, channel):
        await asyncio.sleep(self.delay)
        await super().group_add(group, channel)

    async def group_discard(self, group, channel):
        await asyncio.sleep(self.delay)
        await super().group_discard(group, channel)
