"""Symbol registry and API key lifecycle on real PostgreSQL, through the core and the CLI."""

from __future__ import annotations

import hashlib
import re

import pytest

from marketdata_pipeline.domain import AssetClass, InvalidSymbol, Market, Timeframe
from marketdata_pipeline.errors import AlreadyExists, ConfigError, NotFound
from marketdata_pipeline.registry import api_keys as apikeys
from marketdata_pipeline.registry import symbols as registry
from marketdata_pipeline.registry.stats import stats
from marketdata_pipeline.warehouse import connection as db
from marketdata_pipeline.warehouse.bootstrap import bootstrap
from tests.conftest import run_cli


@pytest.fixture
def url(database_url: str) -> str:
    with db.connection(database_url) as conn:
        bootstrap(conn)
    return database_url


def test_add_get_list_remove_and_reactivate(url: str) -> None:
    with db.connection(url) as conn:
        added = registry.add(conn, " brk.b ", AssetClass.parse("STOCK"))
        assert (added.symbol, added.asset_class, added.active) == ("BRK.B", "stock", True)
        assert added.backfill_status == "pending"
        with pytest.raises(AlreadyExists, match=r"BRK\.B is already registered"):
            registry.add(conn, "BRK.B", AssetClass.ETF)
        with pytest.raises(AlreadyExists, match=r"BTC is already registered \(as crypto\)"):
            registry.add(conn, "btc", AssetClass.STOCK)  # unique across classes
        assert [s.symbol for s in registry.list_symbols(conn, asset_class=AssetClass.ETF)] == [
            "QQQ",
            "SPY",
        ]
        assert len(registry.list_symbols(conn)) == 21

        removed = registry.remove(conn, "brk.b")
        assert not removed.active
        assert "BRK.B" not in registry.active_symbols(conn, Market.STOCK)
        assert "BRK.B" in [s.symbol for s in registry.list_symbols(conn, include_inactive=True)]
        with pytest.raises(NotFound, match="already removed"):
            registry.remove(conn, "BRK.B")

        back = registry.add(conn, "BRK.B", AssetClass.ETF)
        assert back.active and back.asset_class == "etf"


@pytest.mark.parametrize("bad", ["", "1ABC", "AAPL;DROP", "A" * 13, "BT C", "X:BTCUSD"])
def test_symbols_must_match_the_strict_pattern(url: str, bad: str) -> None:
    with db.connection(url) as conn, pytest.raises(InvalidSymbol, match="invalid symbol"):
        registry.add(conn, bad, AssetClass.STOCK)


def test_errors_name_what_was_wrong(url: str) -> None:
    with db.connection(url) as conn:
        with pytest.raises(ConfigError, match="invalid asset class 'bond'"):
            registry.add(conn, "TLT", AssetClass.parse("bond"))
        with pytest.raises(NotFound, match="ZZZZ is not registered"):
            registry.get(conn, "ZZZZ")


def test_stats_count_bars_rejects_and_calendar_gaps(url: str) -> None:
    with db.connection(url) as conn:
        conn.execute(
            "INSERT INTO bars_daily VALUES "
            "('MSFT', '2024-07-01 04:00Z', 1, 2, 1, 1.5, 10, NULL, NULL), "
            "('MSFT', '2024-07-02 04:00Z', 1, 2, 1, 1.5, 10, NULL, NULL), "
            "('MSFT', '2024-07-08 04:00Z', 1, 2, 1, 1.5, 10, NULL, NULL)"
        )
        conn.execute(
            "INSERT INTO bars_rejected (timeframe, symbol, month, reasons) "
            "VALUES ('daily', 'MSFT', '2024-07-01', ARRAY['high below low'])"
        )
        tracked, per_timeframe = stats(conn, "msft")
    daily = next(s for s in per_timeframe if s.timeframe == Timeframe.DAILY)
    assert tracked.symbol == "MSFT" and daily.bars == 3 and daily.rejected == 1
    assert daily.validation_rate == pytest.approx(0.75)
    minute = next(s for s in per_timeframe if s.timeframe == Timeframe.MINUTE)
    assert minute.bars == 0 and minute.validation_rate is None, "no rate over zero bars"
    assert minute.missing_days is None, "no gaps measured without bars"
    # Jul 3 and 5 were sessions (the 4th a holiday, 6-7 a weekend).
    assert [str(d) for d in daily.missing_days or ()] == ["2024-07-03", "2024-07-05"]


def test_api_key_lifecycle_and_audit(url: str) -> None:
    with db.connection(url) as conn:
        key, raw = apikeys.create(conn, "ci-bot")
        assert re.fullmatch(r"mdw_[A-Za-z0-9_-]{43}", raw)
        stored = conn.execute("SELECT key_hash FROM api_keys WHERE id = %s", (key.id,)).fetchone()
        assert stored == (hashlib.sha256(raw.encode()).hexdigest(),)
        assert all(not hasattr(k, "key_hash") for k in apikeys.list_keys(conn))

        def use(raw_key: str, endpoint: str, status: int = 200) -> apikeys.ApiKey:
            try:
                accepted = apikeys.authenticate(conn, raw_key)
            except apikeys.KeyRejected as refused:
                apikeys.record_use(conn, refused.key_id, endpoint, "GET", 401)
                raise
            apikeys.record_use(conn, accepted.id, endpoint, "get", status)
            return apikeys.get(conn, accepted.id)

        use(raw, "/v1/bars/AAPL")
        used = use(raw, "/v1/stats")
        assert used.request_count == 2 and used.last_used_endpoint == "/v1/stats"

        apikeys.revoke(conn, key.id)
        with pytest.raises(apikeys.KeyRejected) as refused:
            use(raw, "/v1/stats")
        assert refused.value.key_id == key.id
        apikeys.restore(conn, key.id)
        assert use(raw, "/v1/stats").request_count == 3, "the revoked key's refusal not counted"

        for stranger in ("not-a-key", apikeys.generate_key()):
            with pytest.raises(apikeys.KeyRejected) as refused:
                use(stranger, "/v1/stats")
            assert refused.value.key_id is None and str(refused.value) == "invalid API key"

        trail = apikeys.audit(conn, key_id=key.id)
        assert [(e.endpoint, e.method, e.status_code) for e in trail] == [
            ("/v1/stats", "GET", 200),
            ("/v1/stats", "GET", 401),  # the refused use of the revoked key
            ("/v1/stats", "GET", 200),
            ("/v1/bars/AAPL", "GET", 200),
        ]
        assert [e.endpoint for e in apikeys.audit(conn, key_id=key.id, limit=2, offset=1)] == [
            "/v1/stats",
            "/v1/stats",
        ]

        apikeys.delete(conn, key.id)
        with pytest.raises(apikeys.KeyRejected):
            use(raw, "/v1/stats")
        with pytest.raises(NotFound, match=f"no API key with id {key.id}"):
            apikeys.revoke(conn, key.id)
        # 4 of the key (outliving it), 3 refusals of keys unknown (or deleted) at the time
        assert len(apikeys.audit(conn)) == 7


def test_cli_symbols_keys_and_stats(url: str) -> None:
    env = {"DATABASE_URL": url}
    assert run_cli("symbols", "add", "hood", env=env).stdout.strip() == "registered HOOD (stock)"
    duplicate = run_cli("symbols", "add", "HOOD", env=env)
    assert duplicate.returncode == 1
    assert (
        duplicate.stderr.strip()
        == "marketdata: error: symbol HOOD is already registered (as stock)"
    )
    bad_class = run_cli("symbols", "add", "X", "--class", "bond", env=env)
    assert bad_class.returncode == 2 and len(bad_class.stderr.strip().splitlines()) == 1
    bad_symbol = run_cli("symbols", "add", "bad!sym", env=env)
    assert bad_symbol.returncode == 2 and bad_symbol.stderr.count("\n") == 1
    assert "invalid symbol 'bad!sym'" in bad_symbol.stderr
    listing = run_cli("symbols", "list", "--class", "crypto", env=env).stdout.splitlines()
    assert [line.split()[0] for line in listing] == ["SYMBOL", "BTC", "ETH", "SOL"]
    assert "removed HOOD" in run_cli("symbols", "remove", "HOOD", env=env).stdout
    assert "HOOD (stock), removed" in run_cli("symbols", "show", "HOOD", env=env).stdout

    created = run_cli("keys", "create", "ops", env=env)
    raw = created.stdout.splitlines()[-1]
    assert re.fullmatch(r"mdw_[A-Za-z0-9_-]{43}", raw)
    keys_listing = run_cli("keys", "list", env=env).stdout
    assert "ops" in keys_listing and raw not in keys_listing
    assert run_cli("keys", "revoke", "2", env=env).stdout.strip() == "revoked key 2"
    assert "revoked" in run_cli("keys", "list", env=env).stdout
    missing = run_cli("keys", "delete", "99", env=env)
    assert missing.returncode == 1 and "no API key with id 99" in missing.stderr
    assert run_cli("keys", "audit", "--limit", "0", env=env).returncode == 2

    stats = run_cli("stats", "AAPL", env=env)
    assert stats.returncode == 0 and "minute" in stats.stdout
    assert run_cli("stats", "NOPE", env=env).returncode == 1
