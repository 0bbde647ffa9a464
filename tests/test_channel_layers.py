"""With REDIS_URL, the channel layer joins a group (every streamed answer joins its stop group) in one round trip
with Redis, and stores what channels-redis stores."""
from __future__ import annotations

import pytest
import redis.asyncio
from channels.layers import get_channel_layer
from django.conf import settings

pytestmark = pytest.mark.skipif("redis" not in settings.CHANNEL_LAYERS["default"]["BACKEND"].lower(),
                                reason="needs REDIS_URL")


async def test_joining_a_group_is_one_round_trip_and_a_message_to_the_group_arrives(monkeypatch):
    layer = get_channel_layer()
    channel = await layer.new_channel()
    group = "layer-test-join"
    await layer.group_discard(group, channel)  # the connection is made (its handshake sends commands of its own)
    sent: list[int] = []
    send = redis.asyncio.Connection.send_packed_command

    async def counted(self, command, check_health=True):
        sent.append(1)
        return await send(self, command, check_health)

    monkeypatch.setattr(redis.asyncio.Connection, "send_packed_command", counted)
    await layer.group_add(group, channel)
    monkeypatch.undo()
    try:
        assert len(sent) == 1
        connection = layer.connection(layer.consistent_hash(group))
        key = layer._group_key(group)
        assert await connection.zscore(key, channel) is not None
        assert 0 < await connection.ttl(key) <= layer.group_expiry
        await layer.group_send(group, {"type": "run.stop"})
        assert await layer.receive(channel) == {"type": "run.stop"}
    finally:
        await layer.group_discard(group, channel)
        await layer.flush()
