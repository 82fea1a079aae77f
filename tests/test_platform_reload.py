"""A live reload next to a third-party platform: the component token keeps its verify ticket.

Found by an adversarial review (the reload rebuilt the component-token source as a plain one:
every renewal after it was refused with 61006).  Real redis-server, the sandbox, real HTTP.
"""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from conftest import base_config
from helpers_platform import COMPONENT_TOKEN_PATH, platform_sections, push_event, wait_for
from helpers_procs import merge

from server.app import start, stop
from server.config_file import load_config
from server.ops.reload import ConfigFile


async def ready_platform(sandbox, port) -> None:
    assert await push_event(sandbox, port, "component_verify_ticket") == (200, "success")
    await wait_for(lambda: sandbox.calls[COMPONENT_TOKEN_PATH] >= 1, 5, "the component token")


@pytest.mark.gen_test(timeout=60)
async def test_reload_keeps_the_verify_ticket_in_the_component_token_request(tmp_path, redis_url, sandbox, sandbox_url, call, redis_sync) -> None:
    """``kill -HUP`` / ``POST /admin/reload`` with the SAME file: the component token must go on
    being renewed.  The reload replaces ``myplatform.component_access_token``'s
    ComponentTokenSource by a plain ``Source`` (server/ops/reload.py apply():
    ``sources = {name: Source(src) ...}``), whose request has no ``component_verify_ticket``:
    WeChat answers 61006 to every renewal, and when the token expires every authorizer stops."""
    sandbox.expires_in = 8  # the component token is renewed ~3 s before its end
    path = str(tmp_path / "config.yaml")
    raw = merge(base_config(redis_url, sandbox_url), {"refresh": {"interval": 0.5, "ahead": 3, "max_ttl": 7000, "timeout": 2},
                                                      **platform_sections(sandbox_url)})
    with open(path, "w") as fh:
        yaml.safe_dump(raw, fh)

    def read(p: str):
        cfg = load_config(p)
        return dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, port=0))

    running = await start(read(path), ConfigFile(path, read))
    try:
        await ready_platform(sandbox, running.port)
        status, body = await call(running.port, "/admin/reload", method="POST", body=b"")
        assert status == 200, body
        before = len(sandbox.requests_to(COMPONENT_TOKEN_PATH))
        await wait_for(lambda: len(sandbox.requests_to(COMPONENT_TOKEN_PATH)) > before, 10, "the component token's renewal")
        renewal = sandbox.requests_to(COMPONENT_TOKEN_PATH)[before]
        assert renewal.errcode == 0, f"the renewal after a reload was refused: errcode {renewal.errcode} (61006: no verify ticket in the request)"
    finally:
        await stop(running, 1.0)
