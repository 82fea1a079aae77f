"""What the status page shows: the refresher's ``status()`` plus what a person needs to act.

:func:`page_data` is the body of ``GET /wechat/status/data``: ``/status``'s per-source fields
as they are (whatever the refresher adds, such as ``calls_today`` / ``quota``, passes
through), and for each source its account, whether a fetch is under way, when the value
was fetched, when a backoff ends, and for a blocked source WeChat's errcode and what to do
about it.  It never holds a value or a secret: values are not read here, and texts that came
from upstream go through the configured-secret redactor.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from server.accounts import Accounts
from server.refresher import Refresher

#: errcode -> what the operator should do (WeChat's fatal and quota codes, see server.upstream)
ADVICE = {
    40164: "This server's IP is not on the account's IP whitelist: add the IP shown in the message "
    "(mp.weixin.qq.com > Settings and development > Basic configuration > IP whitelist), then force a refresh.",
    89503: "WeChat asks the administrator to confirm calls from this IP: confirm it in WeChat, "
    "or add the IP to the whitelist, then force a refresh.",
    89501: "WeChat is waiting for the administrator to confirm calls from this IP: confirm it in WeChat, then force a refresh.",
    89506: "The administrator refused calls from this IP: add it to the IP whitelist, then force a refresh after 24 hours.",
    89507: "The administrator refused calls from this IP: add it to the IP whitelist, then force a refresh after an hour.",
    40013: "WeChat does not know this appid: check accounts.NAME.appid (or the source's args) in the config, then reload.",
    40125: "The AppSecret is wrong (it may have been reset at mp.weixin.qq.com): put the current one in the config, then restart.",
    40002: "Wrong grant_type in the request: check the source's args in the config.",
    41002: "The appid is missing from the request: check the source's args in the config.",
    41004: "The AppSecret is missing from the request: check the account's secret (an unset environment variable?).",
    40243: "The AppSecret is not valid for this call: check the account's secret in the config.",
    48001: "This account may not use this API (unverified account, or the interface is not enabled): check its permissions at mp.weixin.qq.com.",
    61004: "This server's IP is not on the third-party platform's IP whitelist: add it, then force a refresh.",
    60020: "This server's IP is not on the WeCom app's trusted IP list: add it in the WeCom admin console, then force a refresh.",
    45009: "The daily quota of this API is used up: it resets at midnight China time (UTC+8). "
    "An administrator may clear it (clear_quota, a few times a month) and then force a refresh.",
}
DEFAULT_ADVICE = "WeChat refused the credentials: see errmsg and the server log, fix the config, then force a refresh."


def advice(errcode: int) -> str:
    return ADVICE.get(errcode, DEFAULT_ADVICE)


def page_data(refresher: Refresher, accounts: Accounts, redact: Callable[[str], str], holders: dict[str, str | None]) -> dict[str, Any]:
    """The page's view of every source, in config order (see the module docstring).

    Times: ``expires_in``, ``retry_in``, ``block_ends_in`` are seconds from now (None: never);
    ``fetched_at`` is unix seconds on this host's clock (for display only), None without a value.
    ``{"sources": {"access_token": {"state": "ok", "expires_in": 6900, ..., "account": "main",
    "type": "access_token", "refreshing": false, "fetched_at": 1700000000.0, "retry_in": 0,
    "blocked": null, "lock_holder": null}}, "accounts": {"main": {"kind": "official", "appid": "wx123", "default": true}}}``
    """
    status = refresher.status()
    now, wall = time.monotonic(), time.time()
    sources: dict[str, Any] = {}
    for name, fields in status.items():
        state = refresher.states[name]
        account = accounts.owner(name)
        type_ = next((t for t, s in account.sources.items() if s == name), name) if account else name
        entry = state.entry
        block = state.blocked(now)
        flight = state.flight
        sources[name] = {
            **fields,
            # last_error may repeat an upstream message: mask whatever secret it echoes.
            "last_error": redact(str(fields.get("last_error", ""))),
            "account": account.name if account else None,
            "type": type_,
            "refreshing": flight is not None and not flight.done(),
            "lock_holder": holders.get(name),  # the instance fetching it now, any instance
            "fetched_at": round(wall - entry.age(), 3) if entry is not None else None,
            "retry_in": round(max(0.0, state.retry_at - now), 1) if state.failures else 0,
            "blocked": None
            if block is None
            else {
                "errcode": block.errcode,
                "errmsg": redact(block.errmsg),
                "advice": advice(block.errcode),
                "ends_in": None if math.isinf(state.block_until) else round(max(0.0, state.block_until - now)),
            },
        }
    return {
        "sources": sources,
        "accounts": {a.name: {"kind": a.kind, "appid": a.appid, "default": a.default} for a in accounts.by_name.values()},
        "server_time": round(wall, 3),
    }
