"""The ``kind: component`` account (a third-party platform): its checks and its one source.

```yaml
accounts:
  myplatform:
    kind: component
    appid: wx...                       # the platform's component appid
    secret: ${COMPONENT_APPSECRET}
    msg_token: ${MSG_TOKEN}            # the message-verification Token (3-32 letters and digits)
    aes_key: ${ENCODING_AES_KEY}       # the EncodingAESKey: 43 characters of base64
    previous_aes_key: ${OLD_AES_KEY}   # optional: the key before the last change
```

The account expands into one source, ``NAME.component_access_token`` (POST
``/cgi-bin/component/api_component_token``), whose verify ticket is put into the body at fetch
time (:class:`server.platform.tickets.ComponentTokenSource`), never templated from config.
Errors are one line naming the key; no value of a secret key is ever shown.
"""

from __future__ import annotations

import re

from server.config import AccountConfig, ConfigError, PlatformConfig, SourceConfig
from server.platform.crypto import decode_aes_key

KIND = "component"
TYPE = "component_access_token"
TOKEN_PATH = "/cgi-bin/component/api_component_token"
MSG_TOKEN_RE = re.compile(r"^[A-Za-z0-9]{3,32}$")


def source_name(account: str) -> str:
    """The source of a platform's component_access_token (never the plain default names:
    ``access_token`` stays an official account's)."""
    return f"{account}.{TYPE}"


def check_component(path: str, acc: AccountConfig) -> None:
    """Raise ConfigError (one line naming the key) for a platform account that cannot work."""
    for key in ("appid", "secret", "msg_token", "aes_key"):
        if not getattr(acc, key):
            raise ConfigError(f"{path}.{key}: missing; a component account needs appid, secret, msg_token and aes_key")
    if acc.corpid or acc.corpsecret or acc.agentid is not None:
        raise ConfigError(f"{path}: corpid, corpsecret and agentid are for kind: wecom")
    if acc.tickets:
        raise ConfigError(f"{path}.tickets: a platform has no tickets of its own; its authorizers' JS-SDK tickets are fetched when first asked for")
    if not MSG_TOKEN_RE.match(acc.msg_token):
        raise ConfigError(f"{path}.msg_token: the platform's message-verification Token is 3 to 32 letters and digits (open.weixin.qq.com > the platform's development settings)")
    for key in ("aes_key", "previous_aes_key"):
        value = getattr(acc, key)
        if key == "previous_aes_key" and not value:
            continue
        try:
            decode_aes_key(value)
        except ValueError:
            raise ConfigError(f"{path}.{key}: an EncodingAESKey is 43 characters of base64 (A-Z a-z 0-9 + /); got {len(value)} characters") from None
    if acc.previous_aes_key and acc.previous_aes_key == acc.aes_key:
        raise ConfigError(f"{path}.previous_aes_key: same as aes_key; give the key before the last change, or leave it out")


def check_platform(path: str, cfg: PlatformConfig) -> None:
    for key in ("tick", "lease", "replay_window"):
        if not getattr(cfg, key) > 0:
            raise ConfigError(f"{path}.{key}: must be a positive number of seconds")
    for key in ("batch", "concurrency"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{path}.{key}: must be at least 1")


def component_source(acc: AccountConfig, api_base: str) -> SourceConfig:
    """The component_access_token source (the verify ticket is added at fetch time)."""
    return SourceConfig(
        url=f"{api_base}{TOKEN_PATH}",
        method="POST",
        json={"component_appid": acc.appid, "component_appsecret": acc.secret},
        field=TYPE,
    )
