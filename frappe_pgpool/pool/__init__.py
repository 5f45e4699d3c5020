"""The pool engine: no Frappe import, usable and testable on its own."""

from .config import DEFAULT_RESET_QUERY, PoolConfig, parse_config
from .errors import ConfigError, PoolClosed, PoolError, PoolTimeout
from .pool import ConnectionPool
from .registry import PoolKey, PoolRegistry, registry

__all__ = [
	"DEFAULT_RESET_QUERY",
	"ConfigError",
	"ConnectionPool",
	"PoolClosed",
	"PoolConfig",
	"PoolError",
	"PoolKey",
	"PoolRegistry",
	"PoolTimeout",
	"parse_config",
	"registry",
]
