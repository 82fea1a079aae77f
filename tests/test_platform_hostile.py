"""Generated hostile requests at the platform's endpoints: every answer below 500, no secret or
token in any answer, and nothing stored from a request that WeChat did not sign."""

from __future__ import annotations

import urllib.parse

import pytest
from conftest import TEST_SECRET
from helpers_platform import platform_sections
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from server.sandbox.component import DEFAULT_COMPONENT_APPID, push_body

pytestmark = pytest.mark.timeout(120)

_xml = st.one_of(
    st.binary(max_size=400),
    st.builds(lambda appid, enc: f"<xml><AppId>{appid}</AppId><Encrypt><![CDATA[{enc}]]></Encrypt></xml>".encode(),
              st.sampled_from([DEFAULT_COMPONENT_APPID, "", "wx&amp;", "<x/>"]), st.text(max_size=120)),
    st.just(b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY b SYSTEM "file:///etc/passwd">]><xml><AppId>&b;</AppId></xml>'),
    st.just(b"<xml>" + b"<a>" * 500 + b"</a>" * 500 + b"</xml>"),
)
_query = st.dictionaries(st.sampled_from(["timestamp", "nonce", "encrypt_type", "msg_signature", "signature", "openid", "x"]),
                         st.text(max_size=50), max_size=6)


def test_generated_events_and_calls_get_an_answer_below_500(io_loop, make_config, sandbox_url, start_server, call, sandbox, redis_sync) -> None:
    srv = io_loop.run_sync(lambda: start_server(make_config(**platform_sections(sandbox_url))))
    good_query, good_body = push_body(sandbox.component, DEFAULT_COMPONENT_APPID, "component_verify_ticket")
    seen: set[int] = set()

    @settings(max_examples=120, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @example(path="/wechat/component/events", query=good_query, body=good_body, secret=False)
    @example(path="/wechat/component/events", query={**good_query, "msg_signature": "0" * 40}, body=good_body, secret=False)
    @example(path="/wechat/component/authorizers", query={}, body=b'{"authorization_code": 5}', secret=True)
    @example(path="/wechat/token", query={"type": "ticket", "appid": "wxnobody"}, body=None, secret=True)
    @example(path="/wechat/component/status", query={}, body=None, secret=False)
    @given(
        path=st.sampled_from(["/wechat/component/events", "/wechat/component/authorizers", "/wechat/component/status", "/wechat/token"]),
        query=st.one_of(_query, st.builds(lambda q: {**good_query, **q}, _query)),
        body=st.one_of(st.none(), _xml),
        secret=st.booleans(),
    )
    def check(path, query, body, secret):
        method = "GET" if path in ("/wechat/token", "/wechat/component/status") else "POST"
        if method == "GET":
            body = None
        headers = {"X-Token-Secret": TEST_SECRET} if secret else {}
        status, answer = io_loop.run_sync(lambda: call(srv.port, path, method=method, headers=headers, body=body if method == "POST" else None,
                                                       query=urllib.parse.urlencode(query)))
        seen.add(status)
        assert 200 <= status < 500, (status, answer)
        assert TEST_SECRET not in str(answer)

    check()
    assert {200, 400, 401, 403} <= seen, seen  # every layer was reached
    # only the one signed push stored a ticket: the one the sandbox made for it
    assert list(sandbox.component.tickets[DEFAULT_COMPONENT_APPID]) == [redis_sync.hget("myplatform.component_verify_ticket", "ticket")]
