"""Opaque keyset cursors for search paging (the `_cursor` of `next` links).

A cursor carries the whole query (so no NHS Number ever appears in a URL), the keyset
position (the last row's sort value and id: paging stays correct while feeds insert new
studies) and an expiry. It is encrypted and authenticated with AES-256-GCM under a key
derived from LOCATOR_CURSOR_SECRET, or, when that is unset, from a secret generated once
and kept in the service_setting table so that every API process over one database shares
it. Anything that does not decrypt, has expired, or is not ours is refused with 400.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from locator.api.outcomes import InvalidCursorError
from locator.store.models import service_setting_table

CURSOR_VERSION = b"\x01"
NONCE_BYTES = 12
CURSOR_AAD = b"locator/ImagingStudy/_cursor/v1"
SECRET_SETTING_KEY = "cursor_secret"
MAX_CURSOR_CHARS = 4096


@dataclass(frozen=True, slots=True)
class Position:
    """The keyset position after which the next page starts: (sort value, id)."""

    sort_value: str
    study_id: str


@dataclass(frozen=True, slots=True)
class CursorState:
    """What a cursor says: the query's parameters and where the page starts (None = top)."""

    params: tuple[tuple[str, str], ...]
    position: Position | None


def derive_key(secret: str) -> bytes:
    return hashlib.sha256(b"locator cursor key\x00" + secret.encode("utf-8")).digest()


def load_or_create_secret(session_factory: sessionmaker[Session]) -> str:
    """The database-kept cursor secret, created on first use (race-safe across processes)."""
    table = service_setting_table
    query = select(table.c.value).where(table.c.key == SECRET_SETTING_KEY)
    with session_factory() as session:
        existing: str | None = session.execute(query).scalar_one_or_none()
    if existing:
        return existing
    try:
        with session_factory() as session, session.begin():
            session.execute(
                insert(table).values(key=SECRET_SETTING_KEY, value=secrets.token_urlsafe(32))
            )
    except IntegrityError:
        pass  # another process stored it first; read theirs
    with session_factory() as session:
        stored: str = session.execute(query).scalar_one()
    return stored


class CursorCodec:
    """Seals and opens cursors; the key is resolved lazily (no database at app creation)."""

    def __init__(self, secret_source: Callable[[], str], ttl_seconds: int) -> None:
        self._secret_source = secret_source
        self._ttl = ttl_seconds
        self._aead: AESGCM | None = None
        self._lock = threading.Lock()

    def _cipher(self) -> AESGCM:
        if self._aead is None:
            with self._lock:
                if self._aead is None:
                    self._aead = AESGCM(derive_key(self._secret_source()))
        return self._aead

    def seal(self, state: CursorState, *, now: float | None = None) -> str:
        expires = int((time.time() if now is None else now) + self._ttl)
        pos = (
            None if state.position is None else [state.position.sort_value, state.position.study_id]
        )
        plain = orjson.dumps({"q": state.params, "p": pos, "x": expires})
        nonce = os.urandom(NONCE_BYTES)
        sealed = CURSOR_VERSION + nonce + self._cipher().encrypt(nonce, plain, CURSOR_AAD)
        return base64.urlsafe_b64encode(sealed).rstrip(b"=").decode("ascii")

    def open(self, token: str, *, now: float | None = None) -> CursorState:
        raw = self._decode(token)
        nonce, body = raw[1 : 1 + NONCE_BYTES], raw[1 + NONCE_BYTES :]
        try:
            plain = self._cipher().decrypt(nonce, body, CURSOR_AAD)
        except InvalidTag as exc:
            raise InvalidCursorError("invalid _cursor (not issued by this service)") from exc
        data = orjson.loads(plain)
        if data["x"] < (time.time() if now is None else now):
            raise InvalidCursorError("expired _cursor: run the search again")
        pos = data["p"]
        params = tuple((str(k), str(v)) for k, v in data["q"])
        return CursorState(params, None if pos is None else Position(pos[0], pos[1]))

    @staticmethod
    def _decode(token: str) -> bytes:
        if not token or len(token) > MAX_CURSOR_CHARS:
            raise InvalidCursorError("invalid _cursor")
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError) as exc:
            raise InvalidCursorError("invalid _cursor (not base64url)") from exc
        if len(raw) <= 1 + NONCE_BYTES or raw[:1] != CURSOR_VERSION:
            raise InvalidCursorError("invalid _cursor")
        return raw
