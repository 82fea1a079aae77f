"""The Python client never hands out a value WeChat rejected (a review's finding, failed before its fix).

The real server in process, the sandbox as WeChat (shop: classic token, each call a rotation).
"""

from __future__ import annotations

import asyncio

import pytest

from tests import helpers_face
from tests.helpers_face import SHOP_ID, face_config
from tests.test_client import client_for, in_thread
from wechat_token_client import TokenServerError

sandbox = helpers_face.sandbox  # the fixture


@pytest.mark.gen_test(timeout=30)
async def test_a_failed_refresh_after_rejection_forgets_the_rejected_value(make_config, sandbox_url, start_server, sandbox):
    """refresh_after_rejection(value) whose request fails (here: the client's timeout while
    WeChat is slow; the server's fetch still lands a moment later) leaves the rejected value in
    the cache, and get() hands it out again for up to max_age (60 s) although the server holds a
    valid one: every caller makes one more WeChat call with a dead token
    (wechat_token_client/client.py refresh_after_rejection/_fly: nothing forgets ``value``)."""
    srv = await start_server(face_config(make_config, sandbox_url))
    client = client_for(srv, timeout=1.0)
    rejected = await in_thread(client.get, "access_token", "shop")
    sandbox.inject("/cgi-bin/token", "hang", delay=1.5)  # WeChat slower than the client waits
    with pytest.raises(TokenServerError):
        await in_thread(client.refresh_after_rejection, rejected, account="shop")
    await asyncio.sleep(1.0)  # the server's fetch landed
    current = sandbox.current_token(SHOP_ID)
    assert current != rejected
    served = await in_thread(client.get, "access_token", "shop")
    same = served == rejected  # (a bool: the assertion must not print whole tokens)
    assert not same, "get() hands out the value the caller just reported rejected, while the server holds a new one"
