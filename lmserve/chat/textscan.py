"""Small text helpers shared by the streaming reasoning and tool-call parsers."""

from __future__ import annotations

from collections.abc import Iterable

from lmserve.core.events import ChatEvent, TextDelta


def partial_marker_len(text: str, markers: Iterable[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `markers`.

    That suffix must be held back: the next chunk may complete the marker."""
    best = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:size]):
                best = size
                break
    return best


def find_marker(text: str, markers: Iterable[str], start: int = 0) -> tuple[int, str] | None:
    """The earliest occurrence of any marker at or after `start` (the longest one on a tie)."""
    found: tuple[int, str] | None = None
    for marker in markers:
        pos = text.find(marker, start)
        if pos >= 0 and (found is None or pos < found[0]
                         or (pos == found[0] and len(marker) > len(found[1]))):
            found = (pos, marker)
    return found


def push_text(events: list[ChatEvent], channel: str, text: str) -> None:
    """Append text to `events`, merged into the last event when that is text on the same channel."""
    if not text:
        return
    last = events[-1] if events else None
    if isinstance(last, TextDelta) and last.channel == channel:
        events[-1] = TextDelta(channel, last.text + text)
    else:
        events.append(TextDelta(channel, text))
