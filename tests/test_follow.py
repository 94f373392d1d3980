"""The followers' loop (`proxy.web.follow.Followers`): one followed object that fails in a
way its poll did not foresee never stops the others from being followed."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from proxy.web.follow import Followers
from proxy.web.runtime import Runtime

RUNTIME = cast(Runtime, None)  # the fakes below never read it


class Ends:
    def __init__(self) -> None:
        self.polls = 0

    async def poll(self, runtime: Any) -> bool:
        self.polls += 1
        return True


class Breaks:
    def __init__(self) -> None:
        self.polls = 0

    async def poll(self, runtime: Any) -> bool:
        self.polls += 1
        raise AttributeError("'list' object has no attribute 'get'")


def test_a_poll_that_raises_leaves_the_others_followed_and_is_asked_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    followers = Followers()
    ends, breaks = Ends(), Breaks()
    followers.follow("tg_req_ends", ends)
    followers.follow("tg_req_breaks", breaks)
    asyncio.run(followers.poll_all(RUNTIME))
    assert ends.polls == 1 and "tg_req_ends" not in followers.following
    assert "tg_req_breaks" in followers.following
    assert "following tg_req_breaks failed" in caplog.text
    asyncio.run(followers.poll_all(RUNTIME))
    assert breaks.polls == 2
