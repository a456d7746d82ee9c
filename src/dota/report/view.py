"""``dota view``: open a report in the default browser, or serve its folder on localhost."""

from __future__ import annotations

import functools
import http.server
import logging
import threading
import webbrowser
from pathlib import Path

from dota.errors import InputError

log = logging.getLogger(__name__)


def find_report(path: str | Path = "report") -> Path:
    """The ``index.html`` meant by ``path``: the file itself, a report folder, or a folder holding
    ``report/`` (e.g. a ``dota demo`` folder)."""
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() not in (".html", ".htm"):
            raise InputError(f"{p} is not an HTML file; give a report folder or its index.html")
        return p
    for candidate in (p / "index.html", p / "report" / "index.html"):
        if candidate.is_file():
            return candidate
    raise InputError(
        f"no report at {p} (looked for {p / 'index.html'} and {p / 'report' / 'index.html'}); "
        "write one with 'dota report'"
    )


#: Host names the report server answers to: a page on another name (DNS rebinding) gets 403.
ALLOWED_HOSTS: tuple[str, ...] = ("127.0.0.1", "localhost")


def host_allowed(host_header: str | None, port: int) -> bool:
    """Whether a request's ``Host`` header names this server: ``127.0.0.1`` or ``localhost``, with no port
    or this server's ``port``. Anything else (another name resolving to 127.0.0.1, a missing header) is
    refused, so that a web page cannot read the report through DNS rebinding."""
    if not host_header:
        return False
    host, sep, given_port = host_header.strip().lower().rpartition(":")
    if not sep or "]" in given_port:
        host, given_port = host_header.strip().lower(), ""
    return host in ALLOWED_HOSTS and given_port in ("", str(port))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the report's files only: requests for another Host are refused, folders are not listed."""

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        log.debug("view: " + format, *args)

    def _host_ok(self) -> bool:
        if host_allowed(self.headers.get("Host"), self.server.server_address[1]):
            return True
        self.send_error(403, "Forbidden: unknown Host")
        return False

    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        if self._host_ok():
            super().do_GET()

    def do_HEAD(self) -> None:  # noqa: N802
        if self._host_ok():
            super().do_HEAD()

    def list_directory(self, path):  # noqa: ANN001 - the base class's signature
        self.send_error(404, "Not found")
        return None


def serve_report(
    path: str | Path = "report", port: int = 0, host: str = "127.0.0.1"
) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Start serving the report's folder on ``host:port`` (0: any free port) in a background thread.

    Returns the server (call ``shutdown()`` to stop it) and the page's URL.
    """
    index = find_report(path)
    if host not in ALLOWED_HOSTS:
        raise InputError(f"the report is served on localhost only, not {host}")
    if not 0 <= int(port) <= 65535:
        raise InputError(f"port must be from 1 to 65535 (0: any free port), got {port}")
    handler = functools.partial(_QuietHandler, directory=str(index.parent))
    try:
        server = http.server.ThreadingHTTPServer((host, int(port)), handler)
    except OSError as exc:
        raise InputError(f"cannot serve on {host}:{port} ({exc.strerror or exc}); choose another --port") from None
    threading.Thread(target=server.serve_forever, name="dota-view", daemon=True).start()
    url = f"http://{host}:{server.server_address[1]}/{index.name}"
    return server, url


def view_report(path: str | Path = "report", *, port: int | None = None, open_browser: bool = True) -> None:
    """Open the report in the default browser from disk; with ``port`` (or when no browser can be
    opened, or ``open_browser`` is False) serve it on localhost until interrupted, printing the URL."""
    index = find_report(path)
    if port is None and open_browser:
        url = index.resolve().as_uri()
        if webbrowser.open(url):
            print(f"opened {url}")
            return
        print("no browser could be opened; serving the report instead")
    server, url = serve_report(index, port or 0)
    print(f"serving {index.parent.resolve()} at {url}  (Ctrl-C stops)", flush=True)
    if open_browser:
        webbrowser.open(url)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
