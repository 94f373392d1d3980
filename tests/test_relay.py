"""`Relay`: stream chunks handed from the upstream's reader to the client's writer."""

from __future__ import annotations

import asyncio

from proxy.web.relay import Relay


async def test_a_chunk_waited_for_goes_out_alone() -> None:
    relay = Relay()
    events = relay.events()
    waiting = asyncio.ensure_future(anext(events))
    await asyncio.sleep(0)
    relay.put(b"one")
    assert await waiting == b"one"
    relay.close()
    assert [chunk async for chunk in events] == []


async def test_chunks_that_queued_up_go_out_together_in_order() -> None:
    relay = Relay()
    for chunk in (b"a", b"b", b"c"):
        relay.put(chunk)
    events = relay.events()
    assert await anext(events) == b"abc"
    relay.put(b"d")
    relay.put(b"e")
    relay.close()  # the end queued behind them: they still go out, then nothing
    assert [chunk async for chunk in events] == [b"de"]
    assert not relay.listening


async def test_once_the_client_is_gone_nothing_more_is_queued() -> None:
    relay = Relay()
    relay.put(b"a")
    events = relay.events()
    assert await anext(events) == b"a"
    await events.aclose()  # the client hung up
    assert not relay.listening
    relay.put(b"b")
    assert relay._queue.empty()
