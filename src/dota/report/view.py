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


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        log.debug("view: " + format, *args)


def serve_report(
    path: str | Path = "report", port: int = 0, host: str = "127.0.0.1"
) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Start serving the report's folder on ``host:port`` (0: any free port) in a background thread.

    Returns the server (call ``shutdown()`` to stop it) and the page's URL.
    """
    index = find_report(path)
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
