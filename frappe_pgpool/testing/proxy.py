"""A small TCP proxy for fault tests: forwards loopback traffic, and can stall (stop forwarding
without closing, like a network that silently drops packets) or add a one-way delay."""

from __future__ import annotations

import socket
import threading
import time

from .cluster import free_port


class StallingProxy:
	def __init__(self, target_host: str, target_port: int, delay: float = 0.0) -> None:
		self.target = (target_host, target_port)
		self.delay = delay
		self.host = "127.0.0.1"
		self.port = free_port()
		self._flowing = threading.Event()
		self._flowing.set()
		self._stop = threading.Event()
		self._listener: socket.socket | None = None
		self._sockets: list[socket.socket] = []

	def stall(self) -> None:
		self._flowing.clear()

	def resume(self) -> None:
		self._flowing.set()

	def start(self) -> StallingProxy:
		self._listener = socket.create_server((self.host, self.port))
		self._listener.settimeout(0.2)
		threading.Thread(target=self._accept, daemon=True).start()
		return self

	def stop(self) -> None:
		self._stop.set()
		self._flowing.set()
		for sock in [self._listener, *self._sockets]:
			if sock is not None:
				try:
					sock.close()
				except OSError:
					pass

	def _accept(self) -> None:
		assert self._listener is not None
		while not self._stop.is_set():
			try:
				client, _ = self._listener.accept()
			except (TimeoutError, OSError):
				continue
			# a stalled network does not answer the handshake either: hold the client unanswered
			self._flowing.wait()
			try:
				upstream = socket.create_connection(self.target)
			except OSError:
				client.close()
				continue
			self._sockets += [client, upstream]
			for src, dst in ((client, upstream), (upstream, client)):
				threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

	def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
		try:
			while not self._stop.is_set():
				data = src.recv(65536)
				if not data:
					break
				self._flowing.wait()
				if self.delay:
					time.sleep(self.delay)
				dst.sendall(data)
		except OSError:
			pass
		finally:
			for sock in (src, dst):
				try:
					sock.shutdown(socket.SHUT_RDWR)
				except OSError:
					pass

	def __enter__(self) -> StallingProxy:
		return self.start()

	def __exit__(self, *exc: object) -> None:
		self.stop()
