"""URIs from a CSV cannot reach where they should not: private hosts over http(s), local files
from a remote CSV. Real servers on loopback (127.0.0.1 and 127.0.0.2), real reads."""

import http.server
import io
import json
import threading
import time

import pytest
from PIL import Image

from petal import http_reader
from petal.data import load_dataset
from petal.errors import ImageError
from petal.storage import read_bytes


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


class Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    redirects: dict[str, str] = {}

    def do_GET(self):  # noqa: N802 - the http.server API
        if self.path in self.redirects:
            self.send_response(302)
            self.send_header("Location", self.redirects[self.path])
            self.end_headers()
        elif self.path == "/slow.png":
            self.send_response(200)
            self.end_headers()
            time.sleep(2)
        elif self.path in self.files:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(self.files[self.path])
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def servers():
    """Two servers: 127.0.0.1 (the test allows it) and 127.0.0.2 (it does not)."""
    started = []
    for host in ("127.0.0.1", "127.0.0.2"):
        s = http.server.ThreadingHTTPServer((host, 0), Handler)
        threading.Thread(target=s.serve_forever, daemon=True).start()
        started.append(s)
    a, b = (f"http://{s.server_address[0]}:{s.server_address[1]}" for s in started)
    Handler.files = {"/a.png": png(), "/rows.csv": b"uri,label\na.png,red\n/etc/passwd,red\nfile:///etc/hosts,red\n"}
    Handler.redirects = {"/to-b.png": f"{b}/a.png", "/to-a.png": f"{a}/a.png"}
    yield a, b
    for s in started:
        s.shutdown()


def test_private_addresses_are_refused_by_default(servers, monkeypatch):
    a, _ = servers
    monkeypatch.delenv(http_reader.ALLOW_ENV, raising=False)
    for uri in (f"{a}/a.png", "http://169.254.169.254/latest/meta-data/", "http://[::1]/x", "http://10.0.0.1/x"):
        with pytest.raises(ImageError, match=r"refused: .* is a (loopback|link-local|private) address"):
            read_bytes(uri)


def test_allowed_networks_are_read_and_each_redirect_is_checked_again(servers, monkeypatch):
    a, b = servers
    monkeypatch.setenv(http_reader.ALLOW_ENV, "127.0.0.1/32")
    assert read_bytes(f"{a}/a.png") == png()
    assert read_bytes(f"{a}/to-a.png") == png()  # a redirect inside the allowed network
    with pytest.raises(ImageError, match=r"refused: 127.0.0.2 is a loopback address"):
        read_bytes(f"{a}/to-b.png")  # the first hop is allowed, the second is not
    monkeypatch.setenv(http_reader.ALLOW_ENV, "all")
    assert read_bytes(f"{b}/a.png") == png()


def test_time_outs_and_size_cap(servers, monkeypatch):
    a, _ = servers
    monkeypatch.setenv(http_reader.ALLOW_ENV, "all")
    monkeypatch.setattr(http_reader, "CONNECT_TIMEOUT_S", 0.3)
    with pytest.raises(ImageError, match="timed out"):
        read_bytes(f"{a}/slow.png")
    with pytest.raises(ImageError, match="file too large"):
        read_bytes(f"{a}/a.png", max_bytes=10)
    with pytest.raises(ImageError, match="HTTP 404"):
        read_bytes(f"{a}/missing.png")


def test_a_remote_csv_may_not_name_local_files(servers, monkeypatch):
    a, _ = servers
    monkeypatch.setenv(http_reader.ALLOW_ENV, "127.0.0.1/32")
    ds = load_dataset(f"{a}/rows.csv", eval_percent=0, require_train=False)
    assert [e.uri for e in ds.examples] == [f"{a}/a.png"]
    reasons = dict(ds.skipped)
    assert "/etc/passwd: a remote CSV may not name local files" in reasons.values()
    assert "file:///etc/hosts: a remote CSV may not name local files" in reasons.values()


def test_the_cli_option_opens_private_networks(servers, tmp_path, monkeypatch):
    a, _ = servers
    monkeypatch.delenv(http_reader.ALLOW_ENV, raising=False)
    from test_cli import petal

    (tmp_path / "rows.csv").write_text(f"uri,label\n{a}/a.png,red\n")
    r = petal("embed", tmp_path / "rows.csv", "--json", check=False)
    assert r.returncode == 2 and "loopback address" in r.stderr
    r = petal("--allow-private-urls", "127.0.0.1/32", "embed", tmp_path / "rows.csv", "--json")
    assert json.loads(r.stdout.strip().splitlines()[-1])["failed"] == 0
