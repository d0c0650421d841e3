"""Waiting in tests: on the condition that matters, with a deadline, never a bare sleep."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable


def wait_for(
    check: Callable[[], bool], timeout: float = 30.0, what: str = "", every: float = 0.05
) -> None:
    """Poll ``check`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not reached in {timeout:g} s: {what or check}"
        time.sleep(every)


async def wait_until(
    check: Callable[[], bool | Awaitable[bool]], seconds: float = 20.0, what: str = ""
) -> None:
    """Poll ``check`` (plain or async) until it holds; fail naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"not reached in {seconds:g} s: {what or check}"
        await asyncio.sleep(0.05)
