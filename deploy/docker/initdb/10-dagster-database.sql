-- The Dagster instance's storage: a database of its own on the warehouse's server
-- (DAGSTER_PG_URL). Run by the TimescaleDB image on its first start only.
CREATE DATABASE dagster;
