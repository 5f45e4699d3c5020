"""Deployment checks for a whole bench: its pgBouncer (admin console) and its PostgreSQL server(s).

No Frappe import. Every web worker and job process of a bench serves every site, and a pool is per
process and site: a process keeps a connection open for each site it served lately (until
db_pool_max_idle), unless a per-process budget (db_pool_process_budget) caps what it keeps across
all sites. So the checks add up what all the bench's processes can hold at once:

- per pgBouncer (database, user) pool, in session mode: a client pins a server connection for as
  long as it stays connected, idle or not; clients beyond pool_size (+ reserve) wait (cl_waiting)
  and fail after query_wait_timeout. In transaction mode a server is held only during a
  transaction, so idle clients pin nothing and only concurrent transactions count;
- per PostgreSQL server: every connection that reaches it is a backend, and it refuses logins
  beyond max_connections - superuser_reserved_connections (- reserved_connections on 16+). Behind
  pgBouncer that is what its pools may open, without pgBouncer every connection the processes hold.

Each finding says what is wrong, with the numbers, and how to fix it.

The package, from the bottom up: `model` (the bench, its sites and what their processes can hold; no
I/O), `dsn` (the DSNs doctor connects with, and what of them is safe to show), `bouncer` (pgBouncer's
admin console), `postgres` (PostgreSQL's limits), `wording` (how findings name sites, the fix clauses
budgets offer), `bouncer_checks` and `server_checks` (the findings against each pgBouncer and each
PostgreSQL server), `checks` (examine() that runs them all, and the bench's and processes' own checks),
`advice` (what `doctor --apply` sets: the largest db_pool_process_clients every check accepts), `report`
(the findings as text).
"""

from .advice import ClientsAdvice, advise_process_clients
from .bouncer import Bouncer, admin_rows
from .checks import ADMIN_FIX, ARMED_FIX, POSTGRES_FIX, check_processes, examine
from .dsn import (
	ADMIN_DSN_ENV,
	ADMIN_DSN_KEYS,
	POSTGRES_DSN_ENV,
	POSTGRES_DSN_KEYS,
	ResolvedDsn,
	address,
	carries_password,
	describe_error,
	dsn_address,
	dsn_password,
	resolve_admin_dsn,
	resolve_postgres_dsn,
)
from .model import Bench, Connect, Demand, Finding, Site, demand, process_budget, process_clients
from .postgres import Server, read_server
from .report import render

__all__ = [
	"ADMIN_DSN_ENV",
	"ADMIN_DSN_KEYS",
	"ADMIN_FIX",
	"ARMED_FIX",
	"POSTGRES_DSN_ENV",
	"POSTGRES_DSN_KEYS",
	"POSTGRES_FIX",
	"Bench",
	"Bouncer",
	"ClientsAdvice",
	"Connect",
	"Demand",
	"Finding",
	"ResolvedDsn",
	"Server",
	"Site",
	"address",
	"admin_rows",
	"advise_process_clients",
	"carries_password",
	"check_processes",
	"demand",
	"describe_error",
	"dsn_address",
	"dsn_password",
	"examine",
	"process_budget",
	"process_clients",
	"read_server",
	"render",
	"resolve_admin_dsn",
	"resolve_postgres_dsn",
]
