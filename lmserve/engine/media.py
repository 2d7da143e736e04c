"""Where a prompt's images (core.images.MediaSpan) meet the scheduler's token arithmetic.

An image occupies n_tokens prompt positions whose ids are stand-ins. Its embeddings are
decoded in a step of their own (runner decode_media), whole: a text chunk stops before an
image, a sequence standing at an image waits for the media step, and KV reused from the
prefix cache never ends inside an image.
"""

from __future__ import annotations

from collections.abc import Sequence

from lmserve.core.images import MediaSpan


def span_at(spans: Sequence[MediaSpan], pos: int) -> MediaSpan | None:
    """The image that starts at `pos` (the sequence's next position), if one does."""
    for span in spans:
        if span.start == pos:
            return span
    return None


def text_room(spans: Sequence[MediaSpan], pos: int, n: int) -> int:
    """How many of the `n` tokens from `pos` a text chunk may take: up to the next image."""
    for span in spans:
        if span.start >= pos:
            return min(n, span.start - pos)
    return n


def whole(spans: Sequence[MediaSpan], n_reused: int) -> int:
    """A reused prefix of `n_reused` positions, cut back to the start of an image it would
    end inside (an image's KV is decoded whole or not at all)."""
    for span in spans:
        if span.start < n_reused < span.end:
            return span.start
    return n_reused
