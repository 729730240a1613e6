"""Errors that reach an operator: each message is one readable line and holds no secret."""


def first_line(text: str | None, default: str) -> str:
    """The first line of a message, at most 500 characters, or `default` when it is empty."""
    lines = (text or "").strip().splitlines()
    return lines[0][:500] if lines else default


class MarketdataError(Exception):
    """Base class for errors the CLI prints as one line and exits non-zero on."""


class ConfigError(MarketdataError):
    """A setting (environment variable or argument) is invalid."""


class DatabaseUnavailable(MarketdataError):
    """The warehouse cannot be reached."""


class MigrationError(MarketdataError):
    """A migration could not be applied, or an applied one was edited."""


class NotFound(MarketdataError):
    """A named symbol, key or row does not exist."""


class AlreadyExists(MarketdataError):
    """A symbol or key with that identity is already registered."""
