"""Raw API keys delivered to an operator who is not at the terminal that made them.

A key made by a run (a launchpad job in a container of its own) is sealed to the operator's
public key (MARKETDATA_KEY_RECIPIENT, libsodium's sealed box) and kept in the warehouse until
`marketdata keys reveal ID` opens it with the private key and erases it. Only the operator's
identity file opens it: not the run, not the warehouse, not a backup, not the event log.
A public key rather than a shared secret, so no part of the deployment holds a key that opens
what it stores.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg
from nacl.encoding import URLSafeBase64Encoder
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox

from marketdata_pipeline import config
from marketdata_pipeline.errors import AlreadyExists, ConfigError, NotFound
from marketdata_pipeline.registry import api_keys

RECIPIENT_VARIABLE = "MARKETDATA_KEY_RECIPIENT"
IDENTITY_VARIABLE = "MARKETDATA_KEY_IDENTITY"
_PUBLIC_PREFIX = "mdpub_"


def _encode(key: PublicKey | PrivateKey) -> str:
    return key.encode(URLSafeBase64Encoder).decode()


def public_text(key: PublicKey) -> str:
    """The form MARKETDATA_KEY_RECIPIENT takes: `mdpub_` and the key in URL-safe base64."""
    return _PUBLIC_PREFIX + _encode(key)


def parse_recipient(text: str, source: str = RECIPIENT_VARIABLE) -> PublicKey:
    text = text.strip()
    try:
        if not text.startswith(_PUBLIC_PREFIX):
            raise ValueError
        return PublicKey(text[len(_PUBLIC_PREFIX) :].encode(), URLSafeBase64Encoder)
    except (ValueError, TypeError, CryptoError):
        raise ConfigError(
            f"{source} must be a public key like {_PUBLIC_PREFIX}... as "
            "`marketdata keys identity` prints it"
        ) from None


def configured_recipient() -> PublicKey | None:
    raw = (os.environ.get(RECIPIENT_VARIABLE) or "").strip()
    return parse_recipient(raw) if raw else None


def required_recipient(where: str) -> PublicKey:
    """The recipient, or the one line that says a raw key made `where` would reach no one."""
    recipient = configured_recipient()
    if recipient is None:
        raise ConfigError(
            f"{RECIPIENT_VARIABLE} is not set, so a raw key made {where} would reach no "
            "operator: set it to the public key `marketdata keys identity` prints"
        )
    return recipient


def identity_path(path: Path | None = None) -> Path:
    """`path`, else MARKETDATA_KEY_IDENTITY, else `key-identity` in MARKETDATA_HOME."""
    if path is not None:
        return path
    raw = os.environ.get(IDENTITY_VARIABLE)
    return Path(raw) if raw else config.marketdata_home() / "key-identity"


@dataclass(frozen=True)
class Identity:
    """An operator's key pair: the private half opens what was sealed to the public half."""

    private: PrivateKey

    @property
    def recipient(self) -> PublicKey:
        return self.private.public_key


def create_identity(path: Path) -> Identity:
    """A new key pair in a new file only this account can read; never over an existing one,
    which would lose every key sealed to it."""
    identity = Identity(PrivateKey.generate())
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise AlreadyExists(f"{path} already exists: keys sealed to it need it") from None
    with os.fdopen(descriptor, "w") as handle:
        handle.write(
            "# marketdata key identity: private, it opens the API keys sealed to\n"
            f"# {public_text(identity.recipient)}\n{_encode(identity.private)}\n"
        )
    return identity


def load_identity(path: Path) -> Identity:
    try:
        lines = [line.strip() for line in path.read_text().splitlines()]
    except FileNotFoundError:
        raise NotFound(
            f"no key identity at {path}: give --identity, or set {IDENTITY_VARIABLE}"
        ) from None
    body = [line for line in lines if line and not line.startswith("#")]
    try:
        if len(body) != 1:
            raise ValueError
        return Identity(PrivateKey(body[0].encode(), URLSafeBase64Encoder))
    except (ValueError, TypeError, CryptoError):
        raise ConfigError(f"{path} is not a key identity of `marketdata keys identity`") from None


def seal(conn: psycopg.Connection, key_id: int, raw_key: str, recipient: PublicKey) -> None:
    """Keep `raw_key` sealed to `recipient` until it is revealed."""
    conn.execute(
        "INSERT INTO api_key_deliveries (key_id, recipient, sealed) VALUES (%s, %s, %s)",
        (key_id, public_text(recipient), SealedBox(recipient).encrypt(raw_key.encode())),
    )


def reveal(
    conn: psycopg.Connection, key_id: int, identity: Identity, show: Callable[[str], None]
) -> None:
    """`show` the raw key sealed for `key_id`, then erase it, in one transaction: shown once.
    Erased only once `show` returned (a failed write keeps it); a wrong identity erases
    nothing."""
    with conn.transaction():
        row = conn.execute(
            "SELECT recipient, sealed FROM api_key_deliveries WHERE key_id = %s FOR UPDATE",
            (key_id,),
        ).fetchone()
        if row is None:
            api_keys.get(conn, key_id)  # NotFound for a key that does not exist
            raise NotFound(
                f"API key {key_id} has no sealed raw key: revealed already, or made where its "
                "raw key was shown (`keys create`, `marketdata ui`)"
            )
        recipient, sealed = row
        if recipient != public_text(identity.recipient):
            raise ConfigError(
                f"API key {key_id} is sealed to {recipient}, not to this identity's "
                f"{public_text(identity.recipient)}"
            )
        try:
            raw = SealedBox(identity.private).decrypt(bytes(sealed)).decode()
        except (CryptoError, UnicodeDecodeError):
            raise ConfigError(f"the sealed raw key of API key {key_id} is corrupt") from None
        show(raw)
        conn.execute("DELETE FROM api_key_deliveries WHERE key_id = %s", (key_id,))


def sealed_key_ids(conn: psycopg.Connection) -> set[int]:
    """The key ids whose raw key waits to be revealed."""
    return {row[0] for row in conn.execute("SELECT key_id FROM api_key_deliveries")}
