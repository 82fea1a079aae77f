"""What tests steer and watch: queued faults, and the record of every call that reached WeChat."""

from __future__ import annotations

import collections
import dataclasses

from server.sandbox.common import API_PATHS, FAULT_KINDS, JSONDict

# Query arguments that carry a credential: a record keeps their names, never their values.
CREDENTIAL_ARGS = frozenset({"access_token", "secret", "corpsecret", "code", "appsecret",
                             "component_access_token", "component_appsecret"})
TOKEN_PREFIX = 8  # characters of a token a JSON record shows: enough to tell tokens apart
MAX_RECORDS = 10_000  # oldest records go first, so a long benchmark does not grow without bound


@dataclasses.dataclass
class Fault:
    kind: str
    remaining: int | None  # calls still to fault; None until clear_faults()
    errcode: int
    errmsg: str
    status: int
    delay: float  # seconds


class Faults:
    """Faults queued per path, first injected first served."""

    def __init__(self) -> None:
        self._queues: dict[str, collections.deque[Fault]] = {}

    def inject(self, path: str, kind: str, *, times: int | None = 1, errcode: int = -1,
               errmsg: str = "system error", status: int = 500, delay: float = 0.0) -> None:
        """See ``Sandbox.inject``."""
        if path not in API_PATHS:
            raise ValueError(f"no such sandbox path: {path!r}")
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; one of {sorted(FAULT_KINDS)}")
        if times is not None and (not isinstance(times, int) or isinstance(times, bool)
                                  or times < 1):
            raise ValueError(f"times must be a positive integer or None, not {times!r}")
        if not isinstance(errcode, int) or not isinstance(errmsg, str):
            raise TypeError("errcode must be an int and errmsg a str")
        if not isinstance(status, int) or not 400 <= status <= 599:
            raise ValueError(f"status must be an HTTP error status, not {status!r}")
        if not isinstance(delay, (int, float)) or delay < 0:
            raise ValueError(f"delay must be a non-negative number of seconds, not {delay!r}")
        fault = Fault(kind, times, errcode, errmsg, status, float(delay))
        self._queues.setdefault(path, collections.deque()).append(fault)

    def clear(self) -> None:
        self._queues.clear()

    def take(self, path: str) -> Fault | None:
        """The fault this call of ``path`` must suffer, or None; uses up one of its ``times``."""
        queue = self._queues.get(path)
        if not queue:
            return None
        fault = queue[0]
        if fault.remaining is not None:
            fault.remaining -= 1
            if fault.remaining == 0:
                queue.popleft()
        return fault


@dataclasses.dataclass
class RecordedCall:
    """One call that reached the simulator's WeChat side (not the /sandbox/* control API).

    Lets a test see what a proxy forwarded: which token, method, path, arguments and how many
    body bytes. Credentials appear only as argument names; the whole token is kept for
    in-process comparisons but left out of the repr and of ``as_json``.
    """

    method: str
    path: str
    query_keys: tuple[str, ...]  # names of the query arguments, sorted, credentials included
    params: dict[str, str]  # query arguments other than credentials (first value of each)
    body_size: int  # bytes of the request body as received
    body_sha256: str  # hex digest of that body, to compare with what a client sent
    content_type: str  # the request's Content-Type header, "" when absent
    access_token: str | None = dataclasses.field(repr=False)  # the access_token argument
    token_owner: str | None  # appid or corpid the token was issued to; None if unknown
    token_kind: str | None  # "token", "stable" or "corp"; None if unknown
    token_status: int | None  # 0, 40001 or 42001 when the call was answered; None without one
    status: int = 200  # HTTP status answered
    errcode: int = 0  # errcode answered (0 on success)

    def as_json(self) -> JSONDict:
        """JSON-able, with only a short prefix of the token."""
        body = dataclasses.asdict(self)
        token = body.pop("access_token")
        body["query_keys"] = list(self.query_keys)
        body["access_token_prefix"] = token[:TOKEN_PREFIX] if token else None
        return body


def new_records() -> collections.deque[RecordedCall]:
    return collections.deque(maxlen=MAX_RECORDS)
