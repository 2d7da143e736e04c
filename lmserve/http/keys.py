"""API keys: where they come from (flags, LMSERVE_API_KEY, a key file), what each one may do
(its name, limits, whether it administers), and the key table the middleware matches against.

A key file has one key a line, then optional fields:

    # comment
    sk-abc name=ci rpm=60 tpm=20000 max_tokens=512 max_prompt_tokens=4096
    sk-ops name=ops admin

The key itself is a secret: it appears in no error message, log line, info route or metric
label; the key's name stands for it (`key-<8 hex of its SHA-256>` when the line names none).
Keys that share a name share their rate-limit counters."""

from __future__ import annotations

import hashlib
import hmac
import logging
import signal
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("lmserve.keys")

_LIMIT_FIELDS = ("rpm", "tpm", "max_tokens", "max_prompt_tokens")


@dataclass(frozen=True)
class KeyPolicy:
    """What a key may do, without the key: safe to log and to keep in a request's scope."""

    name: str
    admin: bool = False
    rpm: int | None = None  # requests a minute
    tpm: int | None = None  # tokens (prompt + output) a minute
    max_tokens: int | None = None  # output tokens of one request
    max_prompt_tokens: int | None = None  # prompt tokens of one request


@dataclass(frozen=True)
class KeyEntry:
    key: str = field(repr=False)
    policy: KeyPolicy


def default_name(key: str) -> str:
    """A stable name that does not reveal the key."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


def plain_entry(key: str, *, admin: bool = False) -> KeyEntry:
    """A key from a flag or the environment: its default name, no limits."""
    return KeyEntry(key, KeyPolicy(default_name(key), admin=admin))


def parse_line(line: str, where: str) -> KeyEntry | None:
    """One line of a key file; None for a blank line or a comment. Errors name `where`
    (FILE:LINE) and the field, never the key."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    key, *fields = text.split()
    if "=" in key and key.split("=", 1)[0] in ("name", "admin", *_LIMIT_FIELDS):
        raise ValueError(f"{where}: the line starts with a field; put the key first")
    name: str | None = None
    admin = False
    limits: dict[str, int] = {}
    for item in fields:
        if item.startswith("#"):
            break
        label, sep, value = item.partition("=")
        if label == "admin" and not sep:
            admin = True
        elif label == "name" and sep and value:
            name = value
        elif label in _LIMIT_FIELDS and sep:
            try:
                number = int(value)
            except ValueError:
                raise ValueError(f"{where}: {label} must be a whole number, got "
                                 f"{value!r}") from None
            if number < 1:
                raise ValueError(f"{where}: {label} must be at least 1, got {number}")
            if label in limits:
                raise ValueError(f"{where}: {label} is given twice")
            limits[label] = number
        else:
            shown = label if sep else item
            raise ValueError(f"{where}: unknown field {shown!r}; a line is KEY followed by "
                             "name=NAME, rpm=N, tpm=N, max_tokens=N, max_prompt_tokens=N "
                             "or admin")
    return KeyEntry(key, KeyPolicy(name or default_name(key), admin=admin, **limits))


def parse_key_file(path: str | Path) -> tuple[KeyEntry, ...]:
    """Every key of a key file; ValueError naming the file and line of a bad entry."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read the API key file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"the API key file {path} is not UTF-8 text") from None
    entries: list[KeyEntry] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        entry = parse_line(line, f"{path}:{number}")
        if entry is None:
            continue
        if entry.key in seen:
            raise ValueError(f"{path}:{number}: the same key as line {seen[entry.key]}")
        seen[entry.key] = number
        entries.append(entry)
    return tuple(entries)


class KeyTable:
    """The keys a server accepts, matched in constant time: every configured key is compared
    (hmac.compare_digest) whichever matches, so timing tells nothing about which or how much."""

    def __init__(self, entries: Iterable[KeyEntry] = ()) -> None:
        merged: dict[str, KeyEntry] = {}
        for entry in entries:  # a key given twice (a flag and the file): the later wins
            merged[entry.key] = entry
        self.entries = tuple(merged.values())
        self._encoded = tuple((entry.key.encode(), entry.policy) for entry in self.entries)

    @classmethod
    def plain(cls, keys: Iterable[str]) -> KeyTable:
        return cls(plain_entry(key) for key in keys)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def match(self, supplied: str) -> KeyPolicy | None:
        given = supplied.encode()
        found: KeyPolicy | None = None
        for key, policy in self._encoded:
            if hmac.compare_digest(given, key) and found is None:
                found = policy
        return found

    def names(self) -> list[str]:
        return list(dict.fromkeys(entry.policy.name for entry in self.entries))

    def secrets(self) -> frozenset[str]:
        return frozenset(entry.key for entry in self.entries)


class KeyRing:
    """The server's current key table: fixed keys (flags, environment, config) plus a key file
    read again on `reload()` (SIGHUP). A reload swaps the table in one assignment, so a
    request sees the old table or the new one, and requests already admitted are untouched;
    a file that fails to parse leaves the old table in place."""

    def __init__(self, keys: Iterable[str] = (), admin_keys: Iterable[str] = (),
                 key_file: str | Path | None = None) -> None:
        self.fixed = tuple([*(plain_entry(k) for k in keys),
                            *(plain_entry(k, admin=True) for k in admin_keys)])
        self.key_file = key_file
        self._lock = threading.Lock()
        self._table = self._build()  # raises ValueError at start, naming the bad line

    def _build(self) -> KeyTable:
        from_file = parse_key_file(self.key_file) if self.key_file is not None else ()
        return KeyTable([*from_file, *self.fixed])

    @property
    def table(self) -> KeyTable:
        return self._table

    def reload(self) -> bool:
        """Read the key file again; False (and an error logged) when it is bad."""
        if self.key_file is None:
            return True
        with self._lock:
            try:
                table = self._build()
            except ValueError as exc:
                log.error("API keys not reloaded, the previous keys stay in force: %s", exc)
                return False
            self._table = table
        log.info("API keys reloaded from %s: %d key(s)", self.key_file, len(table))
        return True

    def reload_on_sighup(self) -> None:
        """SIGHUP rereads the key file (`lmserve serve`). The reload runs in a thread of its
        own, not in the handler, which interrupts the event loop's thread; connections and
        requests are not touched."""
        if self.key_file is None or not hasattr(signal, "SIGHUP"):
            return
        signal.signal(signal.SIGHUP, lambda signum, frame: threading.Thread(
            target=self.reload, name="lmserve-key-reload", daemon=True).start())
