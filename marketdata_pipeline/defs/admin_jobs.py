"""Jobs an operator launches from the UI's launchpad: symbols and API keys."""

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
from pydantic import Field

from marketdata_pipeline import config
from marketdata_pipeline.defs.resources import WarehouseResource
from marketdata_pipeline.domain import AssetClass
from marketdata_pipeline.errors import MarketdataError
from marketdata_pipeline.registry import api_keys, symbols

TAGS = {"marketdata/kind": "admin"}


class AddSymbolConfig(dg.Config):
    symbol: str = Field(description="Ticker, e.g. AAPL; crypto as its base currency, e.g. BTC.")
    # An enum, so the launchpad offers STOCK, ETF and CRYPTO and refuses anything else
    # before the run starts.
    asset_class: AssetClass = Field(default=AssetClass.STOCK, description="STOCK, ETF or CRYPTO.")


class SymbolConfig(dg.Config):
    symbol: str = Field(description="A registered symbol.")


class CreateKeyConfig(dg.Config):
    name: str = Field(description="Who or what the key is for.")


class KeyIdConfig(dg.Config):
    key_id: int = Field(description="The key's id, as `marketdata keys list` shows it.")


@contextmanager
def failing_clearly() -> Iterator[None]:
    """An operator error (duplicate symbol, unknown key) fails the run with its one line."""
    try:
        yield
    except MarketdataError as error:
        raise dg.Failure(description=str(error)) from None


@dg.op
def register_symbol(
    context: dg.OpExecutionContext, config: AddSymbolConfig, warehouse: WarehouseResource
) -> None:
    with warehouse.connection() as conn, failing_clearly():
        added = symbols.add(conn, config.symbol, config.asset_class)
    context.log.info(
        f"registered {added.symbol} ({added.asset_class}); the registry sensor adds its "
        "partitions and backfills its history on its next tick"
    )


@dg.op
def deactivate_symbol(
    context: dg.OpExecutionContext, config: SymbolConfig, warehouse: WarehouseResource
) -> None:
    with warehouse.connection() as conn, failing_clearly():
        removed = symbols.remove(conn, config.symbol)
    context.log.info(f"removed {removed.symbol}: inactive, its bars are kept")


@dg.op
def issue_api_key(
    context: dg.OpExecutionContext, config: CreateKeyConfig, warehouse: WarehouseResource
) -> None:
    with warehouse.connection() as conn, failing_clearly():
        key, raw = api_keys.create(conn, config.name)
    path = _deliver(key.id, raw)
    # The raw key goes to a file only the operator's account can read, never to the event log.
    context.log.info(f"created API key {key.id} ({key.name}); the raw key is in {path}")


@dg.op
def revoke_api_key(
    context: dg.OpExecutionContext, config: KeyIdConfig, warehouse: WarehouseResource
) -> None:
    with warehouse.connection() as conn, failing_clearly():
        key = api_keys.revoke(conn, config.key_id)
    context.log.info(f"revoked API key {key.id} ({key.name})")


_UNSAFE = {
    errno.EEXIST: "a file or link is already there",
    errno.ELOOP: "the directory is a symbolic link",
    errno.ENOTDIR: "the directory is not a directory",
}


def _deliver(key_id: int, raw: str) -> Path:
    """Write the raw key to a new file only this account can read, or fail the run.

    Never through a link or into a file that is already there: whoever placed it could read
    the key, or have it overwrite another file. The directory is opened once without following
    a link, and the file is created relative to that descriptor, so what is checked is what is
    written to.
    """
    directory = config.marketdata_home() / "api-keys"
    path = directory / f"key-{key_id}.txt"
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            if os.fstat(dir_fd).st_uid != os.geteuid():
                raise PermissionError(errno.EPERM, "the directory is owned by another user")
            os.fchmod(dir_fd, 0o700)  # one that was already there may be open to others
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            descriptor = os.open(path.name, flags, 0o600, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as error:
        reason = _UNSAFE.get(error.errno or 0) or error.strerror or "unknown error"
        raise dg.Failure(
            description=f"API key {key_id} was created, but its raw key could not be written "
            f"safely to {path} ({reason}); revoke it (marketdata keys revoke {key_id}) and "
            "create another"
        ) from None
    with os.fdopen(descriptor, "w") as handle:
        handle.write(raw + "\n")
    return path


@dg.job(tags=TAGS, description="Register a symbol (or reactivate a removed one).")
def add_symbol() -> None:
    register_symbol()


@dg.job(tags=TAGS, description="Remove a symbol: it goes inactive, its bars are kept.")
def remove_symbol() -> None:
    deactivate_symbol()


@dg.job(
    tags=TAGS,
    description="Create an API key. The raw key is written to a file readable only by the "
    "operator ($MARKETDATA_HOME/api-keys/key-<id>.txt), never to the event log.",
)
def create_api_key() -> None:
    issue_api_key()


@dg.job(tags=TAGS, description="Revoke an API key (it can be restored from the CLI).")
def revoke_key() -> None:
    revoke_api_key()


admin_jobs = [add_symbol, remove_symbol, create_api_key, revoke_key]
