"""WeChat's message encryption for the platform's event URL (shared/WECHAT_API.md, *Message encryption*).

- ``msg_signature = sha1(sorted([msg_token, timestamp, nonce, encrypt]) joined)``, hex;
- ``AESKey = base64_decode(EncodingAESKey + "=")``: 32 bytes; AES-256-CBC with IV = the key's
  first 16 bytes (the ``cryptography`` package does the cipher), PKCS#7 padding to a block of
  **32** bytes (``cryptography``'s PKCS7 with a 256-bit block);
- plaintext = 16 random bytes + 4-byte big-endian length + message + the platform's appid.

A platform may change its EncodingAESKey: :class:`MessageCrypto` holds the current key and the
previous one, tries the current first, and says which one worked so the answer (and anything
encrypted back) uses it.  No I/O here; nothing is logged (a body may be a secret).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import struct
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

#: WeChat pads to 32-byte blocks, not AES's 16 (so a 16-byte-padded body is refused).
BLOCK_BITS = 256
#: An EncodingAESKey: 43 characters of base64 (32 bytes once "=" is appended).
AES_KEY_RE = re.compile(r"^[A-Za-z0-9+/]{43}$")


class CryptoError(Exception):
    """A message that fails the signature, decryption or appid check.  ``str()`` names the
    step that failed, never the body or a key."""


def decode_aes_key(encoding_aes_key: str) -> bytes:
    """The 32-byte AES key of a 43-character EncodingAESKey; ValueError when it is not one."""
    if not AES_KEY_RE.match(encoding_aes_key):
        raise ValueError("an EncodingAESKey is 43 characters of base64 (A-Z a-z 0-9 + /)")
    try:
        key = base64.b64decode(encoding_aes_key + "=", validate=True)
    except binascii.Error:
        raise ValueError("an EncodingAESKey is 43 characters of base64 (A-Z a-z 0-9 + /)") from None
    if len(key) != 32:  # cannot happen for 43 valid characters; said rather than assumed
        raise ValueError("an EncodingAESKey decodes to 32 bytes")
    return key


def signature(msg_token: str, timestamp: str, nonce: str, encrypt: str) -> str:
    """WeChat's ``msg_signature`` (hex SHA-1 of the four strings sorted and joined)."""
    return hashlib.sha1("".join(sorted([msg_token, timestamp, nonce, encrypt])).encode()).hexdigest()


@dataclass(frozen=True)
class Decrypted:
    """A message that passed every check: the XML as bytes, and which key opened it
    (0: the current, 1: the previous)."""

    xml: bytes = field(repr=False)
    key_index: int


class MessageCrypto:
    """The checks of one platform: its ``msg_token``, ``appid`` and keys (current first)."""

    def __init__(self, msg_token: str, appid: str, aes_keys: list[str]) -> None:
        if not aes_keys:
            raise ValueError("at least one EncodingAESKey")
        self._token = msg_token
        self.appid = appid
        self._keys = [decode_aes_key(k) for k in aes_keys]

    def __repr__(self) -> str:
        return f"MessageCrypto(appid={self.appid!r}, keys={len(self._keys)})"

    def verify(self, timestamp: str, nonce: str, encrypt: str, msg_signature: str) -> None:
        """Raise CryptoError unless ``msg_signature`` signs the other three (constant time)."""
        expected = signature(self._token, timestamp, nonce, encrypt)
        if not hmac.compare_digest(expected.encode(), msg_signature.lower().encode()):
            raise CryptoError("msg_signature does not match")

    def decrypt(self, encrypt: str) -> Decrypted:
        """The message inside ``encrypt`` (base64), trying the current key, then the previous.

        Raises CryptoError when no key yields a well-formed plaintext for this appid."""
        try:
            data = base64.b64decode(encrypt, validate=True)
        except (binascii.Error, ValueError):
            raise CryptoError("Encrypt is not base64") from None
        if not data or len(data) % 16:
            raise CryptoError("Encrypt is not whole AES blocks")
        why = "no key"
        for i, key in enumerate(self._keys):
            try:
                return Decrypted(self._open(key, data), i)
            except CryptoError as e:
                why = str(e)
        raise CryptoError(why)

    def _open(self, key: bytes, data: bytes) -> bytes:
        decryptor = Cipher(algorithms.AES(key), modes.CBC(key[:16])).decryptor()
        padded = decryptor.update(data) + decryptor.finalize()
        unpadder = padding.PKCS7(BLOCK_BITS).unpadder()
        try:
            plain = unpadder.update(padded) + unpadder.finalize()
        except ValueError:
            raise CryptoError("bad padding (wrong key?)") from None
        if len(plain) < 20:
            raise CryptoError("plaintext too short")
        (length,) = struct.unpack(">I", plain[16:20])
        if 20 + length > len(plain):
            raise CryptoError("length field beyond the plaintext (wrong key?)")
        xml, appid = plain[20:20 + length], plain[20 + length:]
        if not hmac.compare_digest(appid, self.appid.encode()):
            raise CryptoError("appid in the message is not this platform's")
        return xml

    def encrypt(self, xml: bytes, key_index: int = 0, random16: bytes | None = None) -> str:
        """``xml`` encrypted (base64) with key ``key_index``, as WeChat would send it."""
        key = self._keys[key_index]
        plain = (random16 or os.urandom(16)) + struct.pack(">I", len(xml)) + xml + self.appid.encode()
        padder = padding.PKCS7(BLOCK_BITS).padder()
        padded = padder.update(plain) + padder.finalize()
        encryptor = Cipher(algorithms.AES(key), modes.CBC(key[:16])).encryptor()
        return base64.b64encode(encryptor.update(padded) + encryptor.finalize()).decode()

    def sign(self, timestamp: str, nonce: str, encrypt: str) -> str:
        return signature(self._token, timestamp, nonce, encrypt)
