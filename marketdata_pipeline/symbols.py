"""Registry symbols: the strict pattern every symbol passes before it reaches a query."""

from __future__ import annotations

import re

from marketdata_pipeline.errors import ConfigError

ASSET_CLASSES = ("stock", "etf", "crypto")
# Upper-case ticker: a letter, then letters, digits or a class dot (BRK.B), 12 at most.
SYMBOL_PATTERN = re.compile(r"^[A-Z][A-Z0-9.]{0,11}$")
CRYPTO_QUOTE_CURRENCY = "USD"


class InvalidSymbol(ConfigError):
    pass


def normalize(symbol: str) -> str:
    """The registry form of a symbol (upper case), or InvalidSymbol naming it."""
    candidate = symbol.strip().upper()
    if not SYMBOL_PATTERN.fullmatch(candidate):
        shown = symbol if len(symbol) <= 40 else symbol[:40] + "..."
        raise InvalidSymbol(
            f"invalid symbol {shown!r}: expected 1-12 letters, digits or '.', "
            "starting with a letter"
        )
    return candidate


def check_asset_class(asset_class: str) -> str:
    value = asset_class.strip().lower()
    if value not in ASSET_CLASSES:
        raise ConfigError(
            f"invalid asset class {asset_class!r}: expected one of {', '.join(ASSET_CLASSES)}"
        )
    return value


def polygon_ticker(symbol: str, asset_class: str) -> str:
    """Polygon's ticker for a registry symbol: crypto `BTC` is fetched as `X:BTCUSD`."""
    symbol = normalize(symbol)
    if check_asset_class(asset_class) == "crypto":
        return f"X:{symbol}{CRYPTO_QUOTE_CURRENCY}"
    return symbol
