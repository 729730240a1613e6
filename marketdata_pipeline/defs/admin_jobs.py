"""Jobs an operator launches from the UI's launchpad: symbols and API keys."""

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
from pydantic import Field

from marketdata_pipeline.defs.resources import WarehouseResource
from marketdata_pipeline.domain import AssetClass
from marketdata_pipeline.errors import MarketdataError
from marketdata_pipeline.registry import api_keys, key_delivery, symbols

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
    # A run's disk and log are no place for a raw key (its container is gone when it ends):
    # it is sealed to the operator's public key and kept in the warehouse until revealed.
    with failing_clearly():
        recipient = key_delivery.required_recipient("by a run")
        with warehouse.connection() as conn, conn.transaction():
            key, raw = api_keys.create(conn, config.name)
            key_delivery.seal(conn, key.id, raw, recipient)
    context.log.info(
        f"created API key {key.id} ({key.name}), sealed to {key_delivery.public_text(recipient)}: "
        f"`marketdata keys reveal {key.id}` shows it once"
    )


@dg.op
def revoke_api_key(
    context: dg.OpExecutionContext, config: KeyIdConfig, warehouse: WarehouseResource
) -> None:
    with warehouse.connection() as conn, failing_clearly():
        key = api_keys.revoke(conn, config.key_id)
    context.log.info(f"revoked API key {key.id} ({key.name})")


@dg.job(tags=TAGS, description="Register a symbol (or reactivate a removed one).")
def add_symbol() -> None:
    register_symbol()


@dg.job(tags=TAGS, description="Remove a symbol: it goes inactive, its bars are kept.")
def remove_symbol() -> None:
    deactivate_symbol()


@dg.job(
    tags=TAGS,
    description="Create an API key, sealed to MARKETDATA_KEY_RECIPIENT in the warehouse until "
    "`marketdata keys reveal ID` shows it once; never in the event log or on the run's disk.",
)
def create_api_key() -> None:
    issue_api_key()


@dg.job(tags=TAGS, description="Revoke an API key (it can be restored from the CLI).")
def revoke_key() -> None:
    revoke_api_key()


admin_jobs = [add_symbol, remove_symbol, create_api_key, revoke_key]
