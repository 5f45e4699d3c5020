"""The thin Frappe side: which site, which settings, and the two wrappers.

Every decision that is not about Frappe lives in `frappe_pgpool.pool`.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
import weakref
from typing import Any

import psycopg2
import psycopg2.extensions as ext

from .pool import ConfigError, PoolClosed, PoolConfig, PoolKey, opening_to_keep, parse_config, registry
from .pool.config import KEY_PREFIX, PROCESS_BUDGET_KEY, PROCESS_CLIENTS_KEY
from .pool.connection import keepalive_options, may_define_custom_setting
from .publish import Publisher

log = logging.getLogger("frappe_pgpool")

# site -> (its conf's keys, in order; which of them are db_pool_* keys; a fingerprint of their values;
# the parsed config, or None when pooling is off)
_config_cache: dict[str, tuple[tuple, tuple[str, ...], str, PoolConfig | None]] = {}
_config_lock = threading.Lock()
# id(conn) -> weak reference to the Database that checked it out, whose callback gives the connection up
# when that object is collected first; dropped when the connection comes back (then it never fires)
_finalizers: dict[int, weakref.ref] = {}
# libpq options for the pooled connection this thread is opening right now (connect_options, psycopg2_connect)
_connect_options = threading.local()
_KEEPALIVE = keepalive_options()
_keepalive_failed = False  # libpq could not set them on this system: connections go without, as in Frappe
# (site, host, port, dbname, user) -> (password, its PoolKey): the key's digest is made once per identity,
# not per checkout; a changed password replaces the entry (the password is held as Frappe's conf holds it)
_keys: dict[tuple, tuple[str | None, PoolKey]] = {}
# (Frappe's connect arguments but the password, our options) -> (password, the connection string psycopg2
# builds from them): psycopg2's make_dsn escapes every value in Python at each connect; built once per
# identity, it is passed whole (and only parsed, in C). Keyed on str() of each value, as make_dsn writes
# it; a changed password replaces the entry (held as Frappe's conf holds it). A few per site in practice.
_dsns: dict[tuple, tuple[object, str]] = {}
_CONNECT_ARGUMENTS = {"connection_factory", "cursor_factory", "async", "async_"}  # not libpq options
_kind_checked_in = 0  # pid of the process whose kind was last checked (see _note_process_kind)
publisher = Publisher(registry)


def _after_fork_in_child() -> None:
	# Frappe 15's RQ worker forks a work-horse per job while its scheduler thread may be reading site
	# config under _config_lock: the child would block at its first config-cache miss on a copy held by
	# a thread it does not have. The Frappe layer's module locks, and which a child can need:
	# - _config_lock (here): every connection of the child (site_pool_config): re-created.
	# - patch._lock: install() in a work-horse armed late (arming.before_job): re-created in patch.py.
	# - bootstrap._lock: arm() in that same before_job: re-created in bootstrap.py.
	# - Publisher._lock (publish.py): re-created by the Publisher's own fork hook; the registry's and the
	#   budget's locks by the registry's (pool/registry.py). observe.py and arming.py hold no lock.
	global _config_lock
	_config_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def site_pool_config(site: str, conf: Any) -> PoolConfig | None:
	"""The pool settings of a site, or None when the site must behave as plain Frappe.

	Off unless `db_pool_enabled` is set (install-app sets it). A bad value is logged once per
	distinct value, naming the key, and the site is served unpooled rather than failing.
	"""
	# Called at every connection, pooled or not, with a conf Frappe builds anew per request: while its
	# keys are those seen last time (compared in C), only the values of its db_pool_* keys are looked at
	# (by repr, which tells 1 from True and "1"): a few microseconds instead of a Python pass over every
	# key and a dict's repr.
	keys = tuple(conf)
	cached = _config_cache.get(site)
	if cached is not None and cached[0] == keys:
		fingerprint = repr([conf[key] for key in cached[1]])
		if fingerprint == cached[2]:
			return cached[3]
	# Every db_pool_* key, so that a misspelt one is reported; the process budget is the registry's
	# (a bad value there logs and falls back to auto instead of unpooling the site).
	pool_keys = tuple(
		key
		for key in keys
		if isinstance(key, str)
		and key.startswith(KEY_PREFIX)
		and key not in (PROCESS_BUDGET_KEY, PROCESS_CLIENTS_KEY)
	)
	fingerprint = repr([conf[key] for key in pool_keys])
	if cached is not None and cached[1] == pool_keys and cached[2] == fingerprint:
		with _config_lock:  # other keys changed, not these
			_config_cache[site] = (keys, pool_keys, fingerprint, cached[3])
		return cached[3]
	given = {key: conf[key] for key in pool_keys if conf[key] is not None}
	config: PoolConfig | None
	try:
		parsed = parse_config(given)
		config = parsed if parsed.enabled else None
	except ConfigError as e:
		log.error("%s; site %s is served without the pool until it is fixed", e, site)
		config = None
	with _config_lock:
		_config_cache[site] = (keys, pool_keys, fingerprint, config)
	return config


def pool_key(site: str, db: Any) -> PoolKey:
	"""The identity a PostgresDatabase connects with, exactly as its get_connection uses it."""
	host = db.host or db.socket
	port = None if db.socket else db.port
	ident = (site, host, port, db.cur_db_name, db.user)
	cached = _keys.get(ident)
	if cached is not None and cached[0] == db.password:
		return cached[1]
	if len(_keys) > 4096:  # a few per site in practice; never unbounded
		_keys.clear()
	key = PoolKey.make(*ident, db.password)
	_keys[ident] = (db.password, key)
	return key


def get_connection(wrapped, instance, args, kwargs):
	"""Wrapper of PostgresDatabase.get_connection: a pooled connection when the site pools."""
	import frappe

	previous = instance.__dict__.get("_conn")
	if previous is not None and registry.owns(previous):
		# connect() over an open checkout (v16 reconnects on OperationalError without close()):
		# give the old one back first, or it keeps its slot until the object is collected.
		_give_back(instance, previous)
	local = frappe.local
	site = getattr(local, "site", None)
	conf = local.conf if site else None
	config = site_pool_config(site, conf) if site else None
	if config is None:
		instance._pgpool_statements = None
		if site and registry.holds_site(site):
			registry.close_site(site)  # pooling was switched off: drop what this process holds
		return wrapped(*args, **kwargs)

	def connect():
		global _keepalive_failed
		keep = opening_to_keep()
		options = connect_options(site, config, keep)
		try:
			_connect_options.value = options
			try:
				return wrapped(*args, **kwargs)
			except psycopg2.OperationalError as e:
				if "keepalives" not in options or (
					"setsockopt" not in str(e) and "socket option" not in str(e)
				):
					raise
				_keepalive_failed = True  # a kernel without these TCP options: never worse than plain Frappe
				log.warning(
					"frappe_pgpool: TCP keepalive options refused here (%s); connecting without them", e
				)
				_connect_options.value = connect_options(site, config, keep)  # now without them
				return wrapped(*args, **kwargs)
		finally:
			_connect_options.value = None

	if _kind_checked_in != os.getpid():
		_note_process_kind()
	# db_pool_process_budget and db_pool_process_clients are process-wide (common_site_config.json):
	# applied at each checkout
	budget = conf.get(PROCESS_BUDGET_KEY)
	try:
		conn = registry.getconn(
			pool_key(site, instance), config, connect, budget, conf.get(PROCESS_CLIENTS_KEY)
		)
	except PoolClosed:  # switched off by another thread meanwhile (or the process is exiting)
		instance._pgpool_statements = None
		return wrapped(*args, **kwargs)
	_watch(instance, conn)  # first: from here on, an interruption before Frappe holds it is recovered
	publisher.configure(conf.get("redis_cache"))
	instance._pgpool_statements = 0  # sql() calls begun on this checkout (see sql)
	return conn


def _note_process_kind() -> None:
	"""Once per process, at its first pooled checkout: is it an RQ work-horse?

	Frappe 15's `bench worker` forks a work-horse per job, which runs that one job and leaves by os._exit
	(no atexit): whatever it kept would be left to pgBouncer as an idle server per site, and the return's
	reset would be a round trip for nothing. Such a process keeps nothing: its connections are opened and
	closed as plain Frappe's. RQ runs the job in the horse's main thread under Worker.main_work_horse, so
	the stack says it; a worker that runs jobs in-process (SimpleWorker, Frappe 16's no-fork worker
	pool) has no such frame and keeps its connections across jobs.
	"""
	global _kind_checked_in
	_kind_checked_in = os.getpid()
	frame = sys._getframe(1)
	while frame is not None:
		if frame.f_code.co_name == "main_work_horse" and str(frame.f_globals.get("__name__")).startswith(
			"rq"
		):
			registry.keep_nothing()
			return
		frame = frame.f_back


def _watch(instance, conn) -> None:
	"""A Database dropped without close() (frappe.connect over an open one, a lost local) must not keep
	its slot: the connection is given up when the object is collected. A bare weak reference with a
	callback, not weakref.finalize (a quarter of its cost; this runs at every checkout)."""
	_finalizers[id(conn)] = weakref.ref(instance, functools.partial(_abandoned, conn))


def connect_options(site: str, config: PoolConfig, keep: bool) -> dict[str, object]:
	"""The libpq options a pooled connection of the site is opened with, on top of Frappe's own.

	connect_timeout on every one (Frappe's DSN has none: libpq would wait for the kernel's TCP timeout,
	minutes, on a pgBouncer that does not answer). The rest only on a connection the pool will keep
	(`keep`): one it opens for a single request is closed on return as plain Frappe's, so it is opened as
	plain Frappe's, each option costing libpq CPU at every login (benchmarks/plain_path.py). The
	keepalives notice a silent network loss while the connection waits idle in the pool, and
	tcp_user_timeout bounds a statement sent into one. application_name goes in session mode only:
	pgBouncer applies a client's application_name to the server it lends with a SET whenever the server's
	differs, so a name per worker costs a round trip per transaction behind transaction mode and one per
	login in session mode, which plain Frappe, sending none, does not pay. A kept connection logs in once.
	"""
	options: dict[str, object] = {"connect_timeout": config.connect_timeout}
	if not keep:
		return options
	if config.pgbouncer_mode == "session":
		options["application_name"] = application_name(site)
	if not _keepalive_failed:
		options.update(_KEEPALIVE)
	return options


def application_name(site: str) -> str:
	"""Shown by pg_stat_activity and pgBouncer's SHOW CLIENTS: which site and process holds it."""
	suffix = f":{os.getpid()}"
	return "frappe:" + site[: 63 - len("frappe:") - len(suffix)] + suffix  # NAMEDATALEN - 1


def psycopg2_connect(wrapped, instance, args, kwargs):
	"""Wrapper of psycopg2.connect: adds our libpq options while the pool opens a connection.

	Frappe's get_connection builds its own arguments; a thread-local set around the call lets
	each pooled connection carry its own options (connect_options) without a process-wide
	environment variable (threads of a gthread worker connect for different sites).
	Any other caller, or an option the caller set itself, is left alone.
	"""
	options = getattr(_connect_options, "value", None)
	if not options:
		return wrapped(*args, **kwargs)
	if not args and "dsn" not in kwargs and _CONNECT_ARGUMENTS.isdisjoint(kwargs):  # Frappe's call
		password = kwargs.get("password")
		key = (
			tuple((k, str(v)) for k, v in kwargs.items() if k != "password"),
			tuple((k, str(v)) for k, v in options.items()),
		)
		cached = _dsns.get(key)
		if cached is None or cached[0] != password:
			if len(_dsns) > 4096:  # never unbounded
				_dsns.clear()
			cached = _dsns[key] = (password, ext.make_dsn(**{**options, **kwargs}))
		return wrapped(cached[1])
	dsn = args[0] if args else kwargs.get("dsn")
	given = set(ext.parse_dsn(dsn)) if dsn else set()
	kwargs = {**{k: v for k, v in options.items() if k not in given}, **kwargs}
	return wrapped(*args, **kwargs)


def close(wrapped, instance, args, kwargs):
	"""Wrapper of Database.close: give a pooled connection back instead of closing it."""
	conn = instance.__dict__.get("_conn")
	if conn is None or not registry.owns(conn):
		return wrapped(*args, **kwargs)
	_give_back(instance, conn)
	return None


def sql(wrapped, instance, args, kwargs):
	"""Wrapper of Database.sql: retry once when a pooled connection died before its first statement.

	The checkout's liveness check leaves a window: the server can go away between the check and
	the first statement. A retry is safe only when nothing of the transaction or session can have
	been lost, so only the checkout's first statement is retried, and only when psycopg2 was idle
	before it, not in autocommit, and still idle after the failure: its BEGIN, sent first, is what
	failed, so the statement never reached the server. One that was running when its backend died
	(a DBA's pg_terminate_backend, the OOM killer) is not run again. `_pgpool_statements` counts the
	sql() calls begun on the checkout (the get_connection wrapper sets it to 0); a call entered with no connection is the one that connects
	(Frappe connects lazily inside the first sql()), so its statement is the first unless a nested
	sql() ran inside connect() (v15's SET LOCAL statement_timeout), which that nested call counts.
	A statement that connect() runs on the cursor itself (v16's SET search_path) fails inside the
	lazily connecting call and is covered by it: the retry runs connect() again.
	"""
	state = instance.__dict__
	conn = state.get("_conn")
	custom = may_define_custom_setting(args[0] if args else kwargs.get("query"))
	if conn is None:
		expected = 0  # this call connects; nothing else may run on the checkout before its failure
	else:
		count = state.get("_pgpool_statements")
		if count is None:  # not a pooled checkout
			return wrapped(*args, **kwargs)
		if custom:  # no reset can undo it: closed on return instead
			registry.mark(conn, "custom_setting")
		state["_pgpool_statements"] = count + 1
		if count or conn.get_transaction_status() != ext.TRANSACTION_STATUS_IDLE:
			return wrapped(*args, **kwargs)
		expected = 1
	try:
		return wrapped(*args, **kwargs)
	except psycopg2.OperationalError:
		dead = state.get("_conn")
		if (
			dead is None
			or (conn is not None and dead is not conn)
			or state.get("_pgpool_statements") != expected
			or not dead.closed
			or dead.status != ext.STATUS_READY  # psycopg2's BEGIN went through: the statement ran
			or dead.autocommit
			or not registry.owns(dead)
		):
			raise
		log.warning("frappe_pgpool: a pooled connection died before its first statement ran; retrying once")
		_give_back(instance, dead, discard=True)
		return wrapped(*args, **kwargs)  # Frappe's sql() connects again, through the pool
	finally:
		if conn is None and state.get("_pgpool_statements") == 0:
			state["_pgpool_statements"] = 1  # the statement of the call that connected
		# the connection this call opened, or the retry's: marked whatever the statement count (a nested sql()
		# inside connect(), v15's SET LOCAL statement_timeout, moves it); a connection not pooled is ignored
		if custom and state.get("_conn") is not None:
			registry.mark(state["_conn"], "custom_setting")


def _give_back(instance, conn, discard: bool = False) -> None:
	"""Detach a pooled connection from its Database and return it (close, reconnect, retry)."""
	instance._cursor = None
	instance._conn = None
	instance._pgpool_statements = None
	_detach_finalizer(conn)
	registry.putconn(conn, discard)


def _detach_finalizer(conn) -> None:
	_finalizers.pop(id(conn), None)  # a weak reference dropped before its object never calls back


def _abandoned(conn, _ref=None) -> None:
	# Run by the garbage collector, possibly inside an allocation made while this thread holds a pool
	# lock: it must take no lock (a dict pop and a deque append are atomic). The registry discards the
	# connection at its next checkout, return or reaper round.
	_finalizers.pop(id(conn), None)
	registry.abandon(conn)
