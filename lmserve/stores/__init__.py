"""Storage for resumable streams, stored responses and sessions: memory, SQLite or Redis.

    store = await open_store("sqlite:///var/lib/lmserve/lmserve.db")
    await store.responses.put(record); frames = await store.streams.read(stream_id, after=7)
    await store.close()
"""

from lmserve.stores.base import ResponseStore, SessionStore, Store, StreamStore
from lmserve.stores.factory import default_data_dir, open_store
from lmserve.stores.records import (
    ConflictError,
    Frame,
    ItemPage,
    NotFoundError,
    PageQuery,
    ResponseRecord,
    Retention,
    RetentionPolicy,
    Session,
    SessionInfo,
    StreamInfo,
    StreamRetention,
    StreamState,
)

__all__ = [
    "ConflictError", "Frame", "ItemPage", "NotFoundError", "PageQuery", "ResponseRecord",
    "ResponseStore", "Retention", "RetentionPolicy", "Session", "SessionInfo", "SessionStore",
    "Store", "StreamInfo", "StreamRetention", "StreamState", "StreamStore", "default_data_dir",
    "open_store",
]
