"""SGLang sessions: /open_session, /close_session and `session_params` on /generate.

A session is a tree of turns keyed by rid, as in SGLang's session controller. A turn names the
turn it continues (`session_params.rid`); its prompt is that turn's prompt and output (its
output left out with `drop_previous_output`, cut at `offset` when that is set and not 0),
followed by the new input, from which a leading BOS is dropped. Without a rid it starts a new
root. `replace` aborts the named turn if it still runs and drops the branches that grew from it
(without a rid: every turn of the session). Every turn runs under the session's key
(`GenerationRequest.session`), so the engine keeps the KV of the session's latest turn pinned
until the session closes, and the next turn starts after it.

`capacity_of_str_len` bounds a turn's whole prompt, in tokens. Errors are SGLang's 400s: an
unknown or closed session, an unknown rid, a turn that continues one still running, a prompt
over the capacity, a session opened twice.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmserve.core.backend import BackendGeneration
from lmserve.core.errors import ErrorKind, LmserveError, invalid, unsupported
from lmserve.dialects.sglang.encoder import Sample

MAX_OPEN = 1024  # open sessions per server; a client that never closes them cannot grow more
REMEMBER_CLOSED = 4096  # closed ids remembered, so their turns get "closed", not "unknown"


class OpenSessionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    capacity_of_str_len: int = Field(ge=1)
    session_id: str | None = Field(default=None, min_length=1, max_length=256)
    streaming: bool | None = None
    timeout: float | None = None


class CloseSessionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    session_id: str


class SessionParams(BaseModel):
    """`session_params` of /generate (SGLang's SessionParams)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    rid: str | None = None
    offset: int | None = None
    replace: bool | None = None
    drop_previous_output: bool | None = None


@dataclass(eq=False)
class Turn:
    """One request of a session: the prompt it ran with, and its output as read so far."""

    rid: str
    input_ids: list[int]
    max_new_tokens: int | None
    generation: BackendGeneration
    sample: Sample
    parent: Turn | None = None
    children: list[Turn] = field(default_factory=list)

    @property
    def output_ids(self) -> list[int]:
        return self.sample.output_ids

    @property
    def finished(self) -> bool:
        return self.generation.finished

    def context(self, drop_output: bool) -> list[int]:
        """What a turn continuing this one starts from."""
        if drop_output:
            return list(self.input_ids)
        return self.input_ids + self.output_ids[:self.max_new_tokens]

    def abort(self) -> None:
        if not self.finished:
            self.generation.close()  # closing a generation aborts the request

    def subtree(self) -> list[Turn]:
        out = [self]
        for child in self.children:
            out.extend(child.subtree())
        return out


@dataclass(eq=False)
class Session:
    id: str
    capacity: int
    owner: str | None  # the name of the key that opened it (None without keys)
    model: str | None = None  # the served model its turns run on, fixed by the first turn
    turns: dict[str, Turn] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The engine's pin key for this session (GenerationRequest.session)."""
        return f"sglang:{self.id}"

    def drop(self, turn: Turn) -> None:
        """Forget `turn` and everything that grew from it, aborting what still runs."""
        for t in turn.subtree():
            t.abort()
            self.turns.pop(t.rid, None)
        if turn.parent is not None and turn in turn.parent.children:
            turn.parent.children.remove(turn)


@dataclass
class TurnPlan:
    """A session turn about to start: its whole prompt and where it hangs in the tree."""

    session: Session
    parent: Turn | None
    input_ids: list[int]


class Sessions:
    """The open sessions of one server (in memory, as SGLang's are)."""

    def __init__(self) -> None:
        self._open: dict[str, Session] = {}
        self._closed: OrderedDict[str, None] = OrderedDict()

    def open(self, body: OpenSessionRequest, owner: str | None) -> str:
        if body.streaming:
            raise unsupported("streaming", "streaming sessions are not supported; each turn "
                              "names the turn it continues (session_params.rid)")
        if body.timeout is not None:
            raise unsupported("timeout", "sessions do not expire; close them with "
                              "/close_session")
        session_id = body.session_id or uuid.uuid4().hex
        if session_id in self._open:
            raise invalid(f"session '{session_id}' is already open", param="session_id",
                          code="session_exists")
        if len(self._open) >= MAX_OPEN:
            raise LmserveError(ErrorKind.OVERLOADED, f"{MAX_OPEN} sessions are open; close "
                               "one first", code="too_many_sessions", retry_after=1.0)
        self._closed.pop(session_id, None)
        self._open[session_id] = Session(session_id, body.capacity_of_str_len, owner)
        return session_id

    def get(self, session_id: str, caller: str | None, admin: bool,
            param: str = "session_params.id") -> Session:
        session = self._open.get(session_id)
        if session is None:
            why = "was closed" if session_id in self._closed else "does not exist"
            raise invalid(f"session '{session_id}' {why}", param=param,
                          code="session_closed" if session_id in self._closed
                          else "session_not_found")
        if not admin and session.owner != caller:
            raise LmserveError(ErrorKind.PERMISSION, f"session '{session_id}' was opened with "
                               "another key", param=param, code="admin_key_required")
        return session

    def close(self, session_id: str, caller: str | None, admin: bool) -> Session:
        """Close a session: its running turns are aborted, its turns forgotten."""
        session = self.get(session_id, caller, admin, param="session_id")
        del self._open[session_id]
        self._closed[session_id] = None
        while len(self._closed) > REMEMBER_CLOSED:
            self._closed.popitem(last=False)
        for turn in list(session.turns.values()):
            turn.abort()
        session.turns.clear()
        return session

    def all(self) -> list[Session]:
        return list(self._open.values())


def plan_turn(session: Session, params: SessionParams, new_ids: list[int], bos: int | None,
              model: str, rid: str) -> TurnPlan:
    """Resolve a turn's parent and its whole prompt, refusing (with a reason) what SGLang
    aborts; then apply `replace`."""
    if session.model is not None and session.model != model:
        raise invalid(f"session '{session.id}' runs on model '{session.model}', not '{model}'",
                      param="model")
    if rid in session.turns:
        raise invalid(f"session '{session.id}' already has a turn with rid '{rid}'",
                      param="rid", code="duplicate_rid")
    parent: Turn | None = None
    if params.rid is not None:
        parent = session.turns.get(params.rid)
        if parent is None:
            raise invalid(f"session '{session.id}' has no turn with rid '{params.rid}' (a "
                          "replaced branch is gone)", param="session_params.rid",
                          code="session_turn_not_found")
        if not params.replace and not parent.finished:
            raise invalid(f"turn '{params.rid}' of session '{session.id}' has not finished; "
                          "continue it when it has, or replace it", param="session_params.rid",
                          code="session_turn_running")
    if parent is None:
        input_ids = list(new_ids)
    else:
        if new_ids and bos is not None and new_ids[0] == bos:
            new_ids = new_ids[1:]  # an appended turn continues; it does not start a text
        input_ids = parent.context(bool(params.drop_previous_output))
        if params.offset:
            input_ids = input_ids[:params.offset]
        input_ids += new_ids
    if not input_ids:
        raise invalid("the session turn's prompt is empty", param="session_params.offset")
    if len(input_ids) > session.capacity:
        raise invalid(f"the turn's prompt ({len(input_ids)} tokens with the session's history) "
                      f"exceeds the session's capacity_of_str_len ({session.capacity})",
                      param="session_params.id", code="session_capacity_exceeded")
    if params.replace:  # the named turn's branches (or every turn) give way to this one
        if parent is not None:
            parent.abort()
            for child in list(parent.children):
                session.drop(child)
        else:
            for turn in [t for t in session.turns.values() if t.parent is None]:
                session.drop(turn)
    session.model = model
    return TurnPlan(session, parent, input_ids)


def add_turn(plan: TurnPlan, rid: str, max_new_tokens: int | None,
             generation: BackendGeneration, sample: Sample) -> Turn:
    session = plan.session
    turn = Turn(rid, plan.input_ids, max_new_tokens, generation, sample, plan.parent)
    if plan.parent is not None:
        plan.parent.children.append(turn)
    session.turns[rid] = turn
    return turn


def parse_params(raw: object) -> SessionParams:
    """/generate's session_params: one object (a batch cannot be a session turn)."""
    if not isinstance(raw, dict):
        raise invalid("session_params must be one object; a batch of prompts cannot be a "
                      "session turn", param="session_params")
    try:
        return SessionParams.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = "session_params" + "".join(f".{p}" for p in first["loc"])
        raise invalid(f"invalid value for '{param}': {first['msg']}", param=param) from None
