"""The Redis channel layer of a deployment with REDIS_URL: channels-redis' layer, with a group joined in one round
trip with Redis.

Every streamed answer joins a group named after its task id (so that a stop sent to any worker reaches it) and
leaves it when it ends. channels-redis joins with ZADD and then EXPIRE, each awaited on its own: two round trips per
answer where one does, and each a command the server parses and answers apart. The two go out together here, in a
pipeline without MULTI (as before, nothing else depends on them landing together: the group's expiry only bounds
how long a member left behind by a dead process stays).
"""
from __future__ import annotations

import time

from channels_redis.core import RedisChannelLayer


class RedisGroupsChannelLayer(RedisChannelLayer):
    async def group_add(self, group, channel):
        assert self.require_valid_group_name(group), "Group name not valid"
        assert self.require_valid_channel_name(channel), "Channel name not valid"
        key = self._group_key(group)
        async with self.connection(self.consistent_hash(group)).pipeline(transaction=False) as pipe:
            # The member's score is when it joined, as channels-redis writes it (group_send drops expired members).
            pipe.zadd(key, {channel: time.time()})
            pipe.expire(key, self.group_expiry)
            await pipe.execute()
