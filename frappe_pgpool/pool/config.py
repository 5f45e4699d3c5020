"""Pool settings: defaults, validation and parsing from a site config mapping.

No Frappe import here: the Frappe layer passes `frappe.conf` (a dict-like) in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

from .errors import ConfigError

# DISCARD ALL clears every kind of session state a request can leave behind: GUCs (SET,
# set_config), SET ROLE / SESSION AUTHORIZATION, WITH HOLD cursors, prepared statements,
# LISTEN, session advisory locks, cached plans, sequence state and temp tables; and it is what
# pgBouncer itself runs (server_reset_query) when a client leaves. It is sent spelled out
# (connection.DISCARD_ALL_STATEMENTS), so that application_name can be restored in the same round trip.
DEFAULT_RESET_QUERY = "DISCARD ALL"

KEY_PREFIX = "db_pool_"

# Process-wide, not per pool (so not a PoolConfig field): the most server connections one process keeps
# open across all its pools, every site and identity. "auto" (the default): no more than the most
# checkouts the process has run at once, i.e. what plain Frappe would have had open at its peak.
# Set it in common_site_config.json; the value of the site being served applies at each checkout.
PROCESS_BUDGET_KEY = KEY_PREFIX + "process_budget"
PROCESS_BUDGET_MAX = 1000

# Process-wide too, and opt-in: the most connections one process keeps open across the pools of sites
# whose db_pool_pgbouncer_mode is "transaction", a client per site. There a kept connection is a pgBouncer
# client, not a server (pgBouncer lends one per transaction), but the server it last used stays idle in
# its pgBouncer pool until server_idle_timeout, where plain Frappe's disconnect inside its transaction
# makes pgBouncer drop it: about one server per site served lately, which only pgBouncer's settings bound
# (`bench pgpool doctor` checks them against PostgreSQL's max_connections and says when this is safe).
# "auto" (the default): off, those pools share db_pool_process_budget (plain Frappe's peak); a number N:
# they share a client budget of max(N, peak). A checkout never waits for it. Idle clients of quiet sites
# still close after db_pool_max_idle.
PROCESS_CLIENTS_KEY = KEY_PREFIX + "process_clients"
PROCESS_CLIENTS_OFF = 0

PGBOUNCER_MODES = ("session", "transaction")


@dataclass(frozen=True)
class PoolConfig:
	"""Settings of one pool; site_config keys are `db_pool_<field>`."""

	enabled: bool = False  # install-app sets db_pool_enabled=1 for its site
	# Most connections kept per worker process and site, not a bound on what it opens: a checkout that
	# finds the pool keeping that many, all in use, opens one all the same, closed on return as plain
	# Frappe closes it (closed reason "over_size"); nothing but db_pool_process_budget makes it wait.
	# Opened lazily, so a sync worker keeps one; set it to at least a gthread worker's threads. Keep
	# size x processes x sites under pgBouncer's default_pool_size.
	size: int = 8
	# Seconds a checkout waits for the process budget (a numeric db_pool_process_budget) before PoolTimeout.
	timeout: float = 10.0
	# Seconds a connection lives at most (minus up to 10% jitter). In session mode pgBouncer's PAUSE,
	# RECONNECT and safe shutdown (SIGINT) wait until every client leaves: this bounds that wait for
	# busy workers, at the cost of one login per connection per period. 0 disables.
	max_lifetime: float = 600.0
	# Seconds a connection may sit idle before it is closed (by the reaper thread within a second);
	# bounds the same wait for quiet workers. Keep below pgBouncer's client_idle_timeout. 0 disables.
	max_idle: float = 60.0
	# The session reset when a connection comes back, after the rollback, in one round trip (autocommit,
	# with the connect-time settings put back). "" sends nothing: only for apps that never change session state.
	reset_query: str = DEFAULT_RESET_QUERY
	# Seconds a checkout may be held before a warning with the stack that took it. 0 disables.
	leak_warning: float = 0.0
	# libpq connect_timeout (seconds) for new connections, so an unreachable pgBouncer fails fast.
	connect_timeout: int = 5
	# pgBouncer's pool_mode in front of this site: "session" (also right with no pgBouncer: the pool's
	# connection is one server session, reset on return) or "transaction" (a server is lent for one
	# transaction only, so there is no session of ours to reset: the return sends only the rollback; and
	# a kept connection costs a client, not a server: with db_pool_process_clients set, such pools share
	# that client budget instead of db_pool_process_budget).
	pgbouncer_mode: str = "session"

	@classmethod
	def keys(cls) -> list[str]:
		return [KEY_PREFIX + f.name for f in fields(cls)]


def _as_bool(key: str, value: object) -> bool:
	if isinstance(value, bool):
		return value
	if isinstance(value, int) and value in (0, 1):
		return bool(value)
	if isinstance(value, str) and value.strip().lower() in (
		"0",
		"1",
		"true",
		"false",
		"yes",
		"no",
		"on",
		"off",
	):
		return value.strip().lower() in ("1", "true", "yes", "on")
	raise ConfigError(key, value, "0 or 1 (or true/false)")


def _as_number(key: str, value: object, *, integer: bool, minimum: float, maximum: float) -> float:
	# bool is an int subclass; `db_pool_size: true` is a mistake, not 1.
	if isinstance(value, bool) or not isinstance(value, int | float | str):
		raise ConfigError(key, value, _range_text(integer, minimum, maximum))
	try:
		number = int(value) if integer else float(value)
	except (TypeError, ValueError):
		raise ConfigError(key, value, _range_text(integer, minimum, maximum)) from None
	if integer and isinstance(value, float) and not value.is_integer():
		raise ConfigError(key, value, _range_text(integer, minimum, maximum))
	if not math.isfinite(number) or not minimum <= number <= maximum:
		raise ConfigError(key, value, _range_text(integer, minimum, maximum))
	return number


def _range_text(integer: bool, minimum: float, maximum: float) -> str:
	kind = "a whole number" if integer else "a number of seconds"
	return f"{kind} from {minimum:g} to {maximum:g}"


# (integer, minimum, maximum) per numeric field; maxima catch typos such as milliseconds for seconds.
_NUMERIC: dict[str, tuple[bool, float, float]] = {
	"size": (True, 1, 1000),
	"timeout": (False, 0.001, 3600),
	"max_lifetime": (False, 0, 7 * 86400),
	"max_idle": (False, 0, 86400),
	"leak_warning": (False, 0, 86400),
	"connect_timeout": (True, 1, 600),
}


def parse_process_budget(value: object) -> int | None:
	"""db_pool_process_budget: None for "auto" (or unset), else the whole number of connections."""
	if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
		return None
	expected = f'"auto" or {_range_text(True, 1, PROCESS_BUDGET_MAX)}'
	try:
		number = _as_number(PROCESS_BUDGET_KEY, value, integer=True, minimum=1, maximum=PROCESS_BUDGET_MAX)
	except ConfigError:
		raise ConfigError(PROCESS_BUDGET_KEY, value, expected) from None
	return int(number)


def parse_process_clients(value: object) -> int:
	"""db_pool_process_clients: PROCESS_CLIENTS_OFF (0) for "auto" (or unset), else the whole number."""
	if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
		return PROCESS_CLIENTS_OFF
	expected = f'"auto" or {_range_text(True, 1, PROCESS_BUDGET_MAX)}'
	try:
		number = _as_number(PROCESS_CLIENTS_KEY, value, integer=True, minimum=1, maximum=PROCESS_BUDGET_MAX)
	except ConfigError:
		raise ConfigError(PROCESS_CLIENTS_KEY, value, expected) from None
	return int(number)


def parse_config(conf: Mapping[str, object]) -> PoolConfig:
	"""Build a PoolConfig from `db_pool_*` keys; raise ConfigError naming the first bad key.

	Unknown `db_pool_*` keys are errors too: a misspelt key silently ignored is a setting
	the operator believes in and does not have.
	"""
	known = {*PoolConfig.keys(), PROCESS_BUDGET_KEY, PROCESS_CLIENTS_KEY}
	for key in conf:
		if isinstance(key, str) and key.startswith(KEY_PREFIX) and key not in known:
			raise ConfigError(key, conf[key], "one of " + ", ".join(sorted(known)), show_value=False)
	parse_process_budget(conf.get(PROCESS_BUDGET_KEY))  # validated here too; the registry applies it
	parse_process_clients(conf.get(PROCESS_CLIENTS_KEY))  # likewise
	values: dict[str, object] = {}
	for name, (integer, minimum, maximum) in _NUMERIC.items():
		key = KEY_PREFIX + name
		if conf.get(key) is not None:
			number = _as_number(key, conf[key], integer=integer, minimum=minimum, maximum=maximum)
			values[name] = int(number) if integer else number
	if conf.get(KEY_PREFIX + "enabled") is not None:
		values["enabled"] = _as_bool(KEY_PREFIX + "enabled", conf[KEY_PREFIX + "enabled"])
	mode = conf.get(KEY_PREFIX + "pgbouncer_mode")
	if mode is not None:
		if not isinstance(mode, str) or mode.strip().lower() not in PGBOUNCER_MODES:
			raise ConfigError(
				KEY_PREFIX + "pgbouncer_mode", mode, " or ".join(f'"{m}"' for m in PGBOUNCER_MODES)
			)
		values["pgbouncer_mode"] = mode.strip().lower()
	reset = conf.get(KEY_PREFIX + "reset_query")
	if reset is not None:
		if not isinstance(reset, str):
			raise ConfigError(KEY_PREFIX + "reset_query", reset, 'an SQL string ("" for rollback only)')
		values["reset_query"] = reset
	return PoolConfig(**values)
