"""uvicorn around the app: the listening socket (bound here, so a taken port or an unsafe host is one
line before anything starts, and port 0 picks a free one), then the server in the foreground (the verb)
or in a thread (tests, benchmarks)."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time

from slmforge.errors import SlmforgeError

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything, so it is not taken for loopback
        return False


def check_exposure(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond this machine without an API key: anyone who can reach the port could
    use the model (and its compute) otherwise."""
    if api_key is None and not is_loopback(host):
        raise SlmforgeError(f"--host {host}: listening beyond this machine needs an API key (--api-key KEY or the "
                            f"SLMFORGE_API_KEY variable); clients then send Authorization: Bearer KEY")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one), or one line on why not."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise SlmforgeError(f"--host {host}: not an address of this machine ({e})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise SlmforgeError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); "
                            f"choose another --port") from None
    sock.set_inheritable(True)
    return sock


class Server:
    """The app served by uvicorn on an already bound socket."""

    def __init__(self, app, sock: socket.socket, log_level: str = "info", access_log: bool = True):
        import uvicorn

        self.sock = sock
        config = uvicorn.Config(app, log_level=log_level, access_log=access_log, timeout_graceful_shutdown=5,
                                server_header=False)
        self.server = uvicorn.Server(config)
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return client_url(*self.sock.getsockname()[:2])

    def run(self) -> None:
        """Serve until stopped (Ctrl-C / SIGTERM in the main thread)."""
        self.server.run(sockets=[self.sock])

    def start(self, wait: float = 30.0) -> "Server":
        """Serve from a background thread; returns once the server accepts requests."""
        self.thread = threading.Thread(target=self.run, name="slmforge-serve", daemon=True)
        self.thread.start()
        until = time.monotonic() + wait
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > until:
                raise SlmforgeError("the server did not start (see its log)")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=30)
        self.sock.close()


def client_url(host: str, port: int) -> str:
    """The address a client uses for a server listening on (host, port); a server on every interface
    (0.0.0.0, ::) is reached through one of this machine's names, not through that address."""
    if host in ("0.0.0.0", "::"):
        host = socket.gethostname()
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"
