"""Every process publishes its pool reports to Redis, with a TTL, so that one command sees them all.

Keys: frappe_pgpool:stats:<site>:<host>:<pid>, refreshed every PUBLISH_INTERVAL seconds by the
registry's reaper thread, deleted when the process exits, or expiring TTL seconds after it dies. Redis is the
bench's redis_cache; a Redis that is down costs one log line, never a request.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import socket
import threading
import time

from . import observe
from .pool import PoolRegistry

log = logging.getLogger("frappe_pgpool")

PREFIX = "frappe_pgpool:stats:"
PUBLISH_INTERVAL = 5.0
TTL = 20


def _client(url: str):
	import redis  # a dependency of Frappe itself

	return redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)


class Publisher:
	def __init__(self, registry: PoolRegistry) -> None:
		self.registry = registry
		self.url: str | None = None
		self._client = None
		self._last = 0.0
		self._failing = False
		self._seen: dict = {}  # checkouts of each pool at the last round (observe.reports ranks by them)
		self._published: set[str] = set()  # the keys of the last round, deleted when not published again
		self._lock = threading.Lock()
		# the reaper thread may hold it when another thread forks (RQ work-horses)
		os.register_at_fork(after_in_child=self._after_fork)

	def _after_fork(self) -> None:
		self._lock = threading.Lock()
		self._client = None
		self._last = 0.0
		self._seen = {}
		self._published = set()

	def configure(self, url: str | None) -> None:
		"""Called on each pooled checkout with the bench's redis_cache URL; cheap when unchanged."""
		if url and url != self.url:
			with self._lock:
				self.url, self._client, self._last = url, None, 0.0
			if self not in self.registry.listeners:
				self.registry.listeners.append(self)
				atexit.register(self.retract)  # inherited by forks: retract() removes only its own pid's

	def retract(self) -> None:
		"""Delete this process's reports (at exit), so that status stops counting it at once."""
		if self.url is None:
			return
		try:
			client = _client(self.url)
			keys = list(client.scan_iter(match=f"{PREFIX}*:{socket.gethostname()}:{os.getpid()}", count=500))
			if keys:
				client.delete(*keys)
		except Exception:
			pass  # the TTL removes them anyway

	def __call__(self) -> None:
		"""A reaper round: publish if the interval has passed."""
		now = time.monotonic()
		if self.url is None or now - self._last < PUBLISH_INTERVAL:
			return
		self._last = now
		self.publish()

	def payload(self) -> dict[str, str]:
		"""This round's values by key: a report per site of at most observe.DETAIL_POOLS pools in all, and
		one of site observe.OTHER summing the other pools and the dropped ones. With "armed" and the process
		budget (observe.process_fields)."""
		items = observe.reports(self.registry, detail=observe.DETAIL_POOLS, seen=self._seen)
		return {_key(report["site"], report["host"], report["pid"]): json.dumps(report) for report in items}

	def publish(self) -> int:
		payload = self.payload()
		# a site no longer reported one by one (its pools summed, or dropped): its last report goes now,
		# not at its TTL, or readers would count those pools twice meanwhile
		gone = self._published.difference(payload)
		try:
			with self._lock:
				if self._client is None:
					self._client = _client(self.url)
				client = self._client
			pipe = client.pipeline(transaction=False)
			for key, value in payload.items():
				pipe.set(key, value, ex=TTL)
			if gone:
				pipe.delete(*gone)
			pipe.execute()
		except Exception as e:  # stats are best effort; a request never pays for them
			if not self._failing:
				log.warning(
					"frappe_pgpool: cannot publish pool stats to %s: %s", redacted(self.url), redacted(e)
				)
			self._failing = True
			self._published.update(payload)  # maybe written: deleted once no longer published
			return 0
		self._failing = False
		self._published = set(payload)
		return len(payload)


def collect(url: str, site: str | None = None) -> list[dict]:
	"""The live reports of every process (of one site), as published."""
	client = _client(url)
	pattern = f"{PREFIX}{site}:*" if site else f"{PREFIX}*"
	keys = sorted(client.scan_iter(match=pattern, count=500))
	values = client.mget(keys) if keys else []
	return [json.loads(v) for v in values if v]


def _key(site: str, host: str, pid: int) -> str:
	return f"{PREFIX}{site}:{host}:{pid}"


# scheme://user:password@ (any scheme); for non-PostgreSQL schemes a userinfo without ":" may be
# the password itself (redis://secret@host), so it is hidden too.
_USERINFO = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)(?P<userinfo>[^@/?#\s]*)@", re.IGNORECASE)
# a URI query parameter: ?password=... or &password=... (sslpassword too: the client key's passphrase)
_QUERY_PASSWORD = re.compile(r"(?P<lead>[?&](?:ssl)?password=)[^&#\s]*", re.IGNORECASE)
# a libpq keyword/value pair: password=x, password = 'x y \' z' (an unterminated quote runs to the end)
_KEYWORD_PASSWORD = re.compile(
	r"(?P<lead>\b(?:ssl)?password\s*=\s*)(?!\*\*\*(?:[&#\s]|$))(?:'(?:[^'\\]|\\.)*'?|[^\s']\S*)",
	re.IGNORECASE,
)


def redacted(text: object, *secrets: str | None) -> str:
	"""`text` (a URL, a libpq DSN in either form, or an error quoting one) with every password hidden.

	Handles scheme://user:password@host, ?password=/&password= URI parameters, libpq's
	password=... keyword (quoted or not), and any of `secrets` given in clear.
	"""
	if text is None:
		return "None"
	text = str(text)
	for secret in secrets:
		if secret:
			text = text.replace(secret, "***")

	def userinfo(m: re.Match) -> str:
		user, colon, _ = m["userinfo"].partition(":")
		if colon:
			return f"{m['scheme']}{user}:***@"
		if m["scheme"].lower().startswith("postgres"):
			return m[0]  # postgresql://user@host: a user name, no password
		return f"{m['scheme']}***@"

	text = _USERINFO.sub(userinfo, text)
	text = _QUERY_PASSWORD.sub(lambda m: m["lead"] + "***", text)
	return _KEYWORD_PASSWORD.sub(lambda m: m["lead"].rstrip().rstrip("=").rstrip() + "=***", text)
