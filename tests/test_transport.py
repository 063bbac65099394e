"""A response's header block goes out with its body in one write; nothing is reordered, delayed past the next
turn of the event loop, or lost on close."""

from __future__ import annotations

import asyncio

from extender.transport import CoalescingTransport

HEADERS = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n"


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


def run(steps) -> RecordingTransport:  # type: ignore[no-untyped-def]
    async def main() -> RecordingTransport:
        inner = RecordingTransport()
        await steps(CoalescingTransport(inner, asyncio.get_running_loop()), inner)  # type: ignore[arg-type]
        return inner

    return asyncio.run(main())


def test_headers_and_body_are_one_write() -> None:
    async def steps(transport: CoalescingTransport, inner: RecordingTransport) -> None:
        transport.write(HEADERS)
        assert inner.writes == []
        transport.write(b"{}")
        transport.write(HEADERS)
        transport.write(b"[]")
        await asyncio.sleep(0)

    assert run(steps).writes == [HEADERS + b"{}", HEADERS + b"[]"]


def test_headers_alone_go_out_on_the_next_turn() -> None:
    async def steps(transport: CoalescingTransport, inner: RecordingTransport) -> None:
        transport.write(HEADERS)
        await asyncio.sleep(0)
        assert inner.writes == [HEADERS]
        transport.write(b"chunk")  # a body streamed later is not held

    assert run(steps).writes == [HEADERS, b"chunk"]


def test_other_data_passes_through_and_close_flushes_first() -> None:
    async def steps(transport: CoalescingTransport, inner: RecordingTransport) -> None:
        transport.write(b"HTTP/1.1 100 Continue")  # not a whole header block
        transport.writelines([HEADERS, b"{}"])
        transport.write(HEADERS)
        transport.close()
        assert transport.get_extra_info("socket") == "info:socket"

    inner = run(steps)
    assert inner.writes == [b"HTTP/1.1 100 Continue", HEADERS + b"{}", HEADERS] and inner.closed


def test_abort_drops_what_was_held() -> None:
    async def steps(transport: CoalescingTransport, inner: RecordingTransport) -> None:
        transport.write(HEADERS)
        transport.abort()
        await asyncio.sleep(0)

    inner = run(steps)
    assert inner.writes == [] and inner.aborted
