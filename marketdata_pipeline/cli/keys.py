"""`marketdata keys ...`: API keys; the raw key is shown once, only its SHA-256 is stored."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from marketdata_pipeline.cli.common import table, warehouse, when
from marketdata_pipeline.registry import api_keys, key_delivery

# Bounded so an id beyond the bigint column is a usage error, not a PostgreSQL error.
KEY_ID = click.IntRange(1, api_keys.MAX_KEY_ID)


@click.group("keys")
def keys_group() -> None:
    """API keys: the raw key is shown once, only its SHA-256 is stored."""


@keys_group.command("create")
@click.argument("name")
def keys_create(name: str) -> None:
    """Create a key for NAME and print it once."""
    with warehouse() as conn:
        key, raw = api_keys.create(conn, name)
    click.echo(f"created key {key.id} ({key.name}); shown once, store it now:")
    click.echo(raw)


@keys_group.command("list")
def keys_list() -> None:
    """Every key (never its hash)."""
    with warehouse() as conn:
        keys = api_keys.list_keys(conn)
        sealed = key_delivery.sealed_key_ids(conn)
    table(
        ["ID", "NAME", "ACTIVE", "CREATED", "LAST USED", "ENDPOINT", "REQUESTS", "RAW KEY"],
        [
            [k.id, k.name, "yes" if k.active else "revoked", when(k.created_at),
             when(k.last_used), k.last_used_endpoint or "", k.request_count,
             "sealed: keys reveal" if k.id in sealed else "-"]
            for k in keys
        ],
    )  # fmt: skip


IDENTITY = click.Path(dir_okay=False, path_type=Path)


@keys_group.command("identity")
@click.argument("path", required=False, type=IDENTITY)
def keys_identity(path: Path | None) -> None:
    """Make an operator's key pair at PATH (default: MARKETDATA_KEY_IDENTITY, else
    $MARKETDATA_HOME/key-identity) and print its public key, MARKETDATA_KEY_RECIPIENT's value:
    keys that runs create are sealed to it, and only this file opens them."""
    path = key_delivery.identity_path(path)
    identity = key_delivery.create_identity(path)
    click.echo(f"wrote {path} (private: keep it to yourself); set in the deployment:")
    click.echo(f"{key_delivery.RECIPIENT_VARIABLE}={key_delivery.public_text(identity.recipient)}")


@keys_group.command("reveal")
@click.argument("key_id", type=KEY_ID)
@click.option("--identity", "identity_file", type=IDENTITY, help="The key pair's file.")
def keys_reveal(key_id: int, identity_file: Path | None) -> None:
    """Print the raw key of KEY_ID that a run sealed, once: it is erased as it is shown."""
    identity = key_delivery.load_identity(key_delivery.identity_path(identity_file))

    def show(raw: str) -> None:  # the key alone on stdout, for KEY=$(marketdata keys reveal ID)
        click.echo(f"key {key_id}; shown once, store it now:", err=True)
        click.echo(raw)
        sys.stdout.flush()  # a failed write raises here, and the sealed key is kept

    with warehouse() as conn:
        key_delivery.reveal(conn, key_id, identity, show)


def _key_action(action: str, verb: str) -> click.Command:
    @keys_group.command(action, help=f"{verb.capitalize()} the key with id KEY_ID.")
    @click.argument("key_id", type=KEY_ID)
    def command(key_id: int) -> None:
        with warehouse() as conn:
            getattr(api_keys, action)(conn, key_id)
        click.echo(f"{verb} key {key_id}")

    return command


keys_revoke = _key_action("revoke", "revoked")
keys_restore = _key_action("restore", "restored")
keys_delete = _key_action("delete", "deleted")


@keys_group.command("audit")
@click.option("--key", "key_id", type=KEY_ID, help="Only this key's uses.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--offset", default=0, show_default=True, type=click.IntRange(0))
def keys_audit(key_id: int | None, limit: int, offset: int) -> None:
    """The audit log, newest first."""
    with warehouse() as conn:
        if key_id is not None:
            api_keys.get(conn, key_id)  # NotFound: an empty table would say it was never used
        entries = api_keys.audit(conn, key_id=key_id, limit=limit, offset=offset)
    table(
        ["ID", "KEY", "METHOD", "ENDPOINT", "STATUS", "CLIENT", "TIME"],
        [
            [
                e.id,
                e.key_id,
                e.method,
                e.endpoint,
                e.status_code,
                e.client_address or "-",
                when(e.timestamp),
            ]
            for e in entries
        ],
    )
