"""What the stores keep: stream frames, stored responses, sessions; retention; store errors.

Every backend stores JSON. Dicts handed to a store are copied as JSON, so a caller never
shares mutable state with it, and a value that JSON cannot hold fails the same way everywhere.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from lmserve.core.errors import ErrorKind, LmserveError, invalid

JSON = dict[str, Any]
Clock = Callable[[], float]  # unix seconds; injected so tests can move time
Order = Literal["asc", "desc"]

DAY = 86_400.0


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def copy_json(value: Any) -> Any:
    return json.loads(dumps(value))


# ---- errors -------------------------------------------------------------------------------

class NotFoundError(LmserveError):
    """The id names nothing this store holds (never stored, deleted, evicted or expired)."""

    def __init__(self, what: str, ident: str) -> None:
        super().__init__(ErrorKind.NOT_FOUND, f"{what} with id '{ident}' not found.",
                         code="not_found")


class StoreUnavailable(LmserveError):
    """The store cannot be reached (Redis stopped or unreachable): a 503 with Retry-After in
    the caller's dialect, not a 500; the next request tries again (redis-py reconnects)."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorKind.UNAVAILABLE, message, code="store_unavailable",
                         retry_after=1.0)


class ConflictError(LmserveError):
    """The operation contradicts the stored state (duplicate id, append to a finished stream)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(ErrorKind.INVALID_REQUEST, message, code=code)


def check_id(ident: str, what: str) -> str:
    if not isinstance(ident, str) or not ident or len(ident) > 256:
        raise invalid(f"{what} id must be a non-empty string of at most 256 characters")
    return ident


# ---- retention ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Retention:
    """ttl: seconds an entry lives (None: forever); max_entries: size cap, oldest evicted first.

    Responses count their ttl from the first put, sessions from their last append (an idle
    timeout), streams from when they finish.
    """

    ttl: float | None = None
    max_entries: int | None = None

    def __post_init__(self) -> None:
        if self.ttl is not None and self.ttl <= 0:
            raise ValueError(f"retention ttl must be positive or None, got {self.ttl}")
        if self.max_entries is not None and self.max_entries < 1:
            raise ValueError(f"retention max_entries must be >= 1 or None, got {self.max_entries}")

    def expires_at(self, start: float) -> float | None:
        return None if self.ttl is None else start + self.ttl


@dataclass(frozen=True)
class StreamRetention(Retention):
    """Streams also expire max_open_age seconds after creation if they never finish."""

    max_open_age: float | None = 3600.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_open_age is not None and self.max_open_age <= 0:
            raise ValueError("stream max_open_age must be positive or None, "
                             f"got {self.max_open_age}")

    def open_expires_at(self, created_at: float) -> float | None:
        return None if self.max_open_age is None else created_at + self.max_open_age


@dataclass(frozen=True)
class RetentionPolicy:
    # OpenAI keeps stored responses for 30 days; sessions live until deleted.
    responses: Retention = Retention(ttl=30 * DAY)
    sessions: Retention = Retention()
    streams: StreamRetention = StreamRetention(ttl=600.0, max_entries=1000)


def is_expired(expires_at: float | None, now: float) -> bool:
    return expires_at is not None and expires_at <= now


# ---- resumable streams --------------------------------------------------------------------

class StreamState(enum.StrEnum):
    OPEN = "open"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Frame:
    """One SSE frame. Ids count 1, 2, 3... per stream; `after=0` means from the start."""

    id: int
    event: str
    data: str


@dataclass(frozen=True)
class StreamInfo:
    id: str
    state: StreamState
    meta: JSON
    created_at: float
    finished_at: float | None
    last_id: int  # id of the newest frame, 0 when none

    @property
    def finished(self) -> bool:
        return self.state is not StreamState.OPEN


# ---- stored responses ---------------------------------------------------------------------

@dataclass(frozen=True)
class ResponseRecord:
    """A stored OpenAI Responses object.

    Contract: `input_items` is the *resolved* conversation the response was generated from:
    the previous response's `conversation()` followed by this request's own input items. A
    record therefore never needs its ancestors, so deleting or evicting a response breaks no
    response that chains from it. Items should carry an "id" (the pagination cursor).
    `owner`: the name of the API key that created it (None without keys); only that key or
    an admin key may delete it.
    """

    id: str
    created_at: float
    model: str
    input_items: list[JSON]
    response: JSON
    previous_response_id: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    owner: str | None = None

    def conversation(self) -> list[JSON]:
        """The input of a follow-up request: this record's input, then its output items."""
        return [*self.input_items, *self.response.get("output", [])]

    def to_json(self) -> JSON:
        return {"id": self.id, "created_at": self.created_at, "model": self.model,
                "input_items": self.input_items, "response": self.response,
                "previous_response_id": self.previous_response_id, "metadata": self.metadata,
                "owner": self.owner}

    @classmethod
    def from_json(cls, data: JSON) -> ResponseRecord:
        return cls(**data)


@dataclass(frozen=True)
class ItemPage:
    """One page of a list in OpenAI's shape: data, first_id, last_id, has_more."""

    data: list[JSON]
    first_id: str | None
    last_id: str | None
    has_more: bool


@dataclass(frozen=True)
class PageQuery:
    after: str | None = None
    before: str | None = None
    limit: int = 20
    order: Order = "desc"

    def __post_init__(self) -> None:
        if not isinstance(self.limit, int) or not 1 <= self.limit <= 100:
            raise invalid("limit must be an integer between 1 and 100", param="limit")
        if self.order not in ("asc", "desc"):
            raise invalid("order must be 'asc' or 'desc'", param="order")
        if self.after is not None and self.before is not None:
            raise invalid("use either 'after' or 'before', not both", param="before")


def item_id(item: JSON) -> str | None:
    value = item.get("id")
    return value if isinstance(value, str) else None


def unknown_cursor(param: str, cursor: str) -> LmserveError:
    return invalid(f"'{cursor}' is not an input item of this response", param=param)


def make_page(rows: Sequence[JSON], limit: int, *, reverse: bool = False) -> ItemPage:
    """rows: up to limit + 1 items in walk order; the extra one only signals has_more.

    reverse: the walk went backwards from a `before` cursor, so flip it into list order.
    """
    data = list(rows[:limit])
    if reverse:
        data.reverse()
    return ItemPage(data=data, first_id=item_id(data[0]) if data else None,
                    last_id=item_id(data[-1]) if data else None, has_more=len(rows) > limit)


def page_items(items: Sequence[JSON], query: PageQuery) -> ItemPage:
    """Paginate a fully loaded item list (memory and Redis backends)."""
    ordered = list(items) if query.order == "asc" else list(reversed(items))
    cursor, param = (query.before, "before") if query.before is not None else (query.after, "after")
    if cursor is None:
        return make_page(ordered[:query.limit + 1], query.limit)
    ids = [item_id(item) for item in ordered]
    if cursor not in ids:
        raise unknown_cursor(param, cursor)
    at = ids.index(cursor)
    if param == "after":
        return make_page(ordered[at + 1:at + 2 + query.limit], query.limit)
    walk = ordered[max(0, at - query.limit - 1):at][::-1]
    return make_page(walk, query.limit, reverse=True)


# ---- sessions -----------------------------------------------------------------------------

@dataclass(frozen=True)
class SessionInfo:
    id: str
    model: str
    system: str | None
    metadata: JSON
    created_at: float
    updated_at: float
    message_count: int


@dataclass(frozen=True)
class Session(SessionInfo):
    """A session with its transcript: messages in append order (dicts with at least a role)."""

    messages: list[JSON] = field(default_factory=list)


def check_messages(messages: Sequence[JSON]) -> list[JSON]:
    if isinstance(messages, (str, bytes, dict)) or not messages:
        raise invalid("append needs a non-empty list of messages", param="messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise invalid("every message must be an object with a string 'role'",
                          param=f"messages[{index}]")
    copied: list[JSON] = copy_json(list(messages))
    return copied
