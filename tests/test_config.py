"""Site config validation: every bad value names its key; the fallback is the plain (unpooled) path."""

from __future__ import annotations

import os

import pytest

from frappe_pgpool.pool import ConfigError, PoolConfig, parse_config

from .conftest import USERS, scalar


def test_defaults():
	config = parse_config({})
	assert config == PoolConfig()
	assert not config.enabled  # off until install-app (or the operator) sets db_pool_enabled


def test_valid_values_are_parsed():
	config = parse_config(
		{
			"db_pool_enabled": 1,
			"db_pool_size": "12",
			"db_pool_timeout": 2.5,
			"db_pool_max_lifetime": 600,
			"db_pool_max_idle": 0,
			"db_pool_reset_query": "",
			"db_pool_leak_warning": 30,
			"db_pool_connect_timeout": 3,
			"db_name": "not ours, ignored",
		}
	)
	assert config == PoolConfig(
		enabled=True,
		size=12,
		timeout=2.5,
		max_lifetime=600,
		max_idle=0,
		reset_query="",
		leak_warning=30,
		connect_timeout=3,
	)


BAD = [
	("db_pool_enabled", "maybe"),
	("db_pool_enabled", 2),
	("db_pool_size", 0),
	("db_pool_size", -1),
	("db_pool_size", 1.5),
	("db_pool_size", "ten"),
	("db_pool_size", True),
	("db_pool_size", [4]),
	("db_pool_size", 100000),
	("db_pool_timeout", 0),
	("db_pool_timeout", -3),
	("db_pool_timeout", float("nan")),
	("db_pool_timeout", float("inf")),
	("db_pool_max_lifetime", -1),
	("db_pool_max_lifetime", 10**9),
	("db_pool_max_idle", "5m"),
	("db_pool_leak_warning", -1),
	("db_pool_connect_timeout", 0),
	("db_pool_connect_timeout", 2.5),
	("db_pool_reset_query", 5),
	("db_pool_sise", 4),  # misspelt key
	("db_pool_min_size", 1),  # unknown key
]


@pytest.mark.parametrize(("key", "value"), BAD, ids=[f"{k}={v!r}" for k, v in BAD])
def test_bad_values_name_the_key_and_value(key, value):
	with pytest.raises(ConfigError) as raised:
		parse_config({"db_pool_enabled": 1, key: value})
	assert raised.value.key == key
	message = str(raised.value)
	assert key in message and "expected" in message
	if key in PoolConfig.keys():  # a known key's bad value is shown; an unknown key's never is
		assert repr(value) in message


def test_none_means_default():
	assert parse_config({"db_pool_size": None}).size == PoolConfig().size


def test_the_frappe_layer_reports_a_misspelt_key(caplog):
	"""site_pool_config reads a site's conf: an unknown db_pool_* key (a typo) is an error naming it,
	and the site is served unpooled, as for any bad value; not silently ignored."""
	from frappe_pgpool.frappe_layer import site_pool_config

	with caplog.at_level("ERROR", logger="frappe_pgpool"):
		assert site_pool_config("typo.local", {"db_pool_enabled": 1, "db_pool_sise": 4}) is None
	assert "db_pool_sise" in caplog.text and "typo.local" in caplog.text
	assert site_pool_config("typo.local", {"db_pool_enabled": 1, "db_pool_size": 4}).size == 4


def test_the_frappe_layer_sees_every_change_of_a_sites_pool_keys(caplog):
	"""site_pool_config runs at every connection on a conf Frappe builds anew per request, and only looks
	at the db_pool_* values while the keys are those of last time: a changed value (True to 1, which
	compare equal), a key added, removed or reordered, each is seen; a bad value is logged once."""
	from frappe_pgpool.frappe_layer import site_pool_config

	site = "changes.local"
	conf = {"db_name": "_x", "db_pool_enabled": 1, "db_pool_size": 3, "redis_cache": "redis://h"}
	assert site_pool_config(site, dict(conf)).size == 3
	assert site_pool_config(site, {**conf, "db_pool_size": 5}).size == 5
	with caplog.at_level("ERROR", logger="frappe_pgpool"):
		assert site_pool_config(site, {**conf, "db_pool_size": True}) is None  # == 1, but not a number
		assert site_pool_config(site, {**conf, "db_pool_size": True}) is None
	assert caplog.text.count("db_pool_size") == 1
	assert site_pool_config(site, {**conf, "db_pool_size": 1}).size == 1
	assert site_pool_config(site, {**conf, "other": 1}).size == 3  # another key: the same settings
	assert site_pool_config(site, {"db_pool_size": 2, **conf, "db_pool_timeout": 4}).timeout == 4
	reordered = site_pool_config(site, dict(reversed(conf.items())))  # and db_pool_timeout gone
	assert (reordered.size, reordered.timeout) == (3, PoolConfig().timeout)
	assert site_pool_config(site, {**conf, "db_pool_enabled": 0}) is None
	assert site_pool_config(site, conf).size == 3
	assert site_pool_config(site, {k: v for k, v in conf.items() if k != "db_pool_enabled"}) is None
	assert site_pool_config(site, {**conf, "db_pool_size": None}).size == 8  # null: the default


def test_an_unknown_keys_value_is_not_echoed():
	with pytest.raises(ConfigError) as raised:
		parse_config({"db_pool_admin_dsn": "postgresql://u:s3cret@h/db"})
	assert "db_pool_admin_dsn" in str(raised.value) and "s3cret" not in str(raised.value)


@pytest.mark.parametrize(
	("mode", "keep", "named"),
	[
		("session", True, True),
		("session", False, False),
		("transaction", True, False),
		("transaction", False, False),
	],
)
def test_libpq_options_of_a_pooled_connection(mode, keep, named):
	"""application_name only where plain Frappe would not pay for it (pgBouncer SETs it on the server it
	lends); the keepalives only on a connection the pool keeps (each libpq option costs CPU at login, and
	one opened for a single request is closed as plain Frappe's); connect_timeout on every one."""
	from frappe_pgpool.frappe_layer import connect_options
	from frappe_pgpool.pool.connection import keepalive_options

	config = PoolConfig(enabled=True, pgbouncer_mode=mode, connect_timeout=7)
	options = connect_options("site1.local", config, keep)
	assert options["connect_timeout"] == 7
	assert (keepalive_options().items() <= options.items()) is keep
	if not keep:
		assert options == {"connect_timeout": 7}
	assert ("application_name" in options) is named
	if named:
		assert options["application_name"] == f"frappe:site1.local:{os.getpid()}"


def test_the_pools_libpq_options_reach_the_connection_however_psycopg2_is_called(bouncer):
	"""The psycopg2.connect wrapper adds the pool's options while a pooled connection is opened. Called as
	Frappe calls it (keywords), it builds the connection string once per identity and passes it whole;
	with a DSN, or a caller's own value for one of the options, the caller's value wins. A changed
	password replaces its identity's string: the old one is not kept."""
	import psycopg2

	from frappe_pgpool import frappe_layer
	from frappe_pgpool.pool.connection import keepalive_options

	def connect(*args, **kwargs):
		return frappe_layer.psycopg2_connect(psycopg2.connect, None, args, kwargs)

	frappe_like = {
		"user": "app1",
		"dbname": "app1",
		"host": bouncer.host,
		"password": USERS["app1"],
		"port": bouncer.port,
	}
	options = {"connect_timeout": 7, **keepalive_options()}
	frappe_layer._connect_options.value = options
	try:
		opened = [connect(**frappe_like) for _ in range(3)]
		built = len(frappe_layer._dsns)
		opened.append(connect(**frappe_like))
		assert len(frappe_layer._dsns) == built  # the same identity's next call reuses the string
		opened.append(connect(**{**frappe_like, "connect_timeout": 3}))  # the caller's own value wins
		opened.append(connect(bouncer.dsn("app1", USERS["app1"], "app1", connect_timeout=4)))
		entries = len(frappe_layer._dsns)

		def holding_the_password() -> int:
			return sum(USERS["app1"] in dsn for _password, dsn in frappe_layer._dsns.values())

		held = holding_the_password()
		with pytest.raises(psycopg2.OperationalError):  # a changed password replaces the entry
			connect(**{**frappe_like, "password": "changed"})
		assert len(frappe_layer._dsns) == entries and holding_the_password() == held - 1
	finally:
		frappe_layer._connect_options.value = None
	plain = connect(**frappe_like)  # not opened by the pool: nothing added
	try:
		params = [c.get_dsn_parameters() for c in opened]
		assert all(p["keepalives"] == "1" and p["tcp_user_timeout"] == "60000" for p in params)
		assert [p["connect_timeout"] for p in params] == ["7", "7", "7", "7", "3", "4"]
		assert all(scalar(c, "select current_user") == "app1" for c in opened)
		assert "keepalives" not in plain.get_dsn_parameters()
		assert not any(USERS["app1"] in str(v) for p in params for v in p.values())  # no password shown
	finally:
		for c in [*opened, plain]:
			c.close()
