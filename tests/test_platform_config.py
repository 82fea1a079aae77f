"""The kind: component account: one-line errors naming the key, secrets never shown."""

from __future__ import annotations

import pytest
import yaml

from server.accounts import Accounts
from server.config import ConfigError
from server.config_file import parse_config
from server.redact import config_secrets

AES = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQ"  # 43 characters
OLD = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopq"


def raw(**platform):
    return {
        "server": {"secret": "s" * 24},
        "redis": {"url": "redis://127.0.0.1:1"},
        "accounts": {
            "main": {"appid": "wx1234567890abcdef", "secret": "a" * 32},
            "myplatform": {"kind": "component", "appid": "wxcomp7890abcdef12", "secret": "c" * 32,
                           "msg_token": "MsgToken123", "aes_key": AES, **platform},
        },
    }


def parse(cfg):
    return parse_config(yaml.safe_dump(cfg), env={})


def test_a_platform_expands_into_its_component_token_and_keeps_the_default() -> None:
    cfg = parse(raw(previous_aes_key=OLD))
    # the official account keeps the plain names: adding a platform does not rename its keys
    assert "access_token" in cfg.sources
    src = cfg.sources["myplatform.component_access_token"]
    assert src.url.endswith("/cgi-bin/component/api_component_token") and src.method == "POST"
    assert src.json == {"component_appid": "wxcomp7890abcdef12", "component_appsecret": "c" * 32}
    # not an account with an access_token of its own
    assert set(Accounts.from_config(cfg).by_name) == {"main"}
    shown = repr(cfg)
    assert AES not in shown and OLD not in shown and "MsgToken123" not in shown
    assert {AES, OLD, "MsgToken123"} <= set(config_secrets(cfg))


@pytest.mark.parametrize(("change", "message"), [
    ({"aes_key": AES[:-1]}, "accounts.myplatform.aes_key: an EncodingAESKey is 43 characters"),
    ({"aes_key": AES[:-1] + "="}, "accounts.myplatform.aes_key: an EncodingAESKey is 43 characters"),
    ({"aes_key": ""}, "accounts.myplatform.aes_key: missing"),
    ({"previous_aes_key": "x" * 10}, "accounts.myplatform.previous_aes_key: an EncodingAESKey"),
    ({"previous_aes_key": AES}, "accounts.myplatform.previous_aes_key: same as aes_key"),
    ({"msg_token": "a-b"}, "accounts.myplatform.msg_token: the platform's message-verification Token"),
    ({"msg_token": ""}, "accounts.myplatform.msg_token: missing"),
    ({"secret": "change-me"}, "accounts.myplatform.secret: does not look like a secret"),
    ({"tickets": ["jsapi"]}, "accounts.myplatform.tickets: a platform has no tickets"),
    ({"corpid": "ww1"}, "accounts.myplatform: corpid, corpsecret and agentid are for kind: wecom"),
])
def test_errors_name_the_key(change, message) -> None:
    with pytest.raises(ConfigError) as e:
        parse(raw(**change))
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)
    for value in change.values():
        if isinstance(value, str) and len(value) > 8:
            assert value not in str(e.value)


def test_platform_section_is_checked() -> None:
    cfg = raw()
    cfg["platform"] = {"batch": 0}
    with pytest.raises(ConfigError, match=r"^platform.batch: must be at least 1"):
        parse(cfg)
