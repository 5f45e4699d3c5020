"""The pool engine: no Frappe import, usable and testable on its own."""

from .budget import ProcessBudget
from .config import DEFAULT_RESET_QUERY, PROCESS_BUDGET_KEY, PoolConfig, parse_config, parse_process_budget
from .errors import ConfigError, PoolClosed, PoolError, PoolTimeout
from .pool import ConnectionPool, opening_to_keep
from .registry import PoolKey, PoolRegistry, registry

__all__ = [
	"DEFAULT_RESET_QUERY",
	"PROCESS_BUDGET_KEY",
	"ConfigError",
	"ConnectionPool",
	"PoolClosed",
	"PoolConfig",
	"PoolError",
	"PoolKey",
	"PoolRegistry",
	"PoolTimeout",
	"ProcessBudget",
	"opening_to_keep",
	"parse_config",
	"parse_process_budget",
	"registry",
]
