"""The platform's message crypto (server.platform.crypto), checked against an independent
encoder (the sandbox's: server.sandbox.component) and against tampering."""

from __future__ import annotations

import base64
import os

import pytest

from server.platform.crypto import CryptoError, MessageCrypto, decode_aes_key, signature
from server.sandbox.component import encrypt_message

APPID = "wxcomponent00000001"
TOKEN = "platform-msg-token"


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()[:43]


def test_round_trip_with_the_sandbox_encoder() -> None:
    key = new_key()
    crypto = MessageCrypto(TOKEN, APPID, [key])
    xml = "<xml><AppId>wx</AppId><InfoType>component_verify_ticket</InfoType></xml>".encode()
    encrypted = encrypt_message(key, APPID, xml)
    assert crypto.decrypt(encrypted).xml == xml
    # and ours decrypts to the same with the sandbox's reading of it
    assert crypto.decrypt(crypto.encrypt(xml)).xml == xml


def test_padding_is_to_32_bytes() -> None:
    key = new_key()
    crypto = MessageCrypto(TOKEN, APPID, [key])
    for n in range(0, 70):
        raw = base64.b64decode(crypto.encrypt(b"x" * n))
        assert len(raw) % 32 == 0
        assert crypto.decrypt(base64.b64encode(raw).decode()).xml == b"x" * n


def test_signature_and_tampering() -> None:
    crypto = MessageCrypto(TOKEN, APPID, [new_key()])
    enc = crypto.encrypt(b"<xml/>")
    sig = signature(TOKEN, "1700000000", "nonce1", enc)
    crypto.verify("1700000000", "nonce1", enc, sig)  # no error
    crypto.verify("1700000000", "nonce1", enc, sig.upper())
    for ts, nonce, body, s in [
        ("1700000001", "nonce1", enc, sig),
        ("1700000000", "nonce2", enc, sig),
        ("1700000000", "nonce1", enc[:-4] + "AAA=", sig),
        ("1700000000", "nonce1", enc, "0" * 40),
        ("1700000000", "nonce1", enc, ""),
    ]:
        with pytest.raises(CryptoError):
            crypto.verify(ts, nonce, body, s)


def test_wrong_appid_is_refused() -> None:
    key = new_key()
    other = encrypt_message(key, "wxsomeoneelse0000001", b"<xml/>")
    with pytest.raises(CryptoError, match="appid"):
        MessageCrypto(TOKEN, APPID, [key]).decrypt(other)


def test_wrong_key_is_refused() -> None:
    encrypted = encrypt_message(new_key(), APPID, b"<xml>hello</xml>")
    with pytest.raises(CryptoError):
        MessageCrypto(TOKEN, APPID, [new_key()]).decrypt(encrypted)


def test_previous_key_still_opens_and_says_so() -> None:
    old, new = new_key(), new_key()
    crypto = MessageCrypto(TOKEN, APPID, [new, old])
    assert crypto.decrypt(encrypt_message(old, APPID, b"<a/>")).key_index == 1
    assert crypto.decrypt(encrypt_message(new, APPID, b"<a/>")).key_index == 0
    # answering with the key that worked
    assert MessageCrypto(TOKEN, APPID, [old]).decrypt(crypto.encrypt(b"<b/>", key_index=1)).xml == b"<b/>"


@pytest.mark.parametrize("body", ["", "not base64!", base64.b64encode(b"short").decode(), base64.b64encode(os.urandom(48)).decode()])
def test_garbage_is_a_crypto_error(body: str) -> None:
    with pytest.raises(CryptoError):
        MessageCrypto(TOKEN, APPID, [new_key()]).decrypt(body)


@pytest.mark.parametrize("bad", ["", "short", "a" * 44, "a" * 42 + "!", "a" * 42 + "="])
def test_aes_key_shape(bad: str) -> None:
    with pytest.raises(ValueError):
        decode_aes_key(bad)


def test_repr_holds_no_key() -> None:
    key = new_key()
    assert key not in repr(MessageCrypto(TOKEN, APPID, [key]))
    assert TOKEN not in repr(MessageCrypto(TOKEN, APPID, [key]))
