"""URIs from a CSV cannot reach where they should not: private hosts over http(s), local files
from a remote CSV. Real servers on loopback (127.0.0.1 and 127.0.0.2), real reads."""

import http.server
import io
import ipaddress
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
        elif self.path == "/drip.png":
            self.send_response(200)
            self.send_header("Content-Length", "40")
            self.end_headers()
            for _ in range(40):
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return  # the reader hung up: the point of the test
                time.sleep(0.2)
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
    Handler.redirects = {"/to-b.png": f"{b}/a.png", "/to-a.png": f"{a}/a.png",
                         "/to-ftp.png": "ftp://127.0.0.1:1/a.png"}
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


# --------------------------------------------------------------------------- TLS, deadlines, redirects


def tls_files(folder, *, self_signed: bool = False):
    """(ca.pem, cert.pem, key.pem) for a server at 127.0.0.1: a test CA signs the server's
    certificate, or (self_signed) the certificate signs itself and no CA vouches for it."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def build(subject, issuer, public_key, signer, ca: bool):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
             .not_valid_after(now + datetime.timedelta(hours=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                critical=False)
        return b.sign(signer, hashes.SHA256())

    ca = build(name("petal test CA"), name("petal test CA"), ca_key.public_key(), ca_key, True)
    cert = build(name("127.0.0.1"), name("127.0.0.1") if self_signed else ca.subject, key.public_key(),
                 key if self_signed else ca_key, False)
    pem = serialization.Encoding.PEM
    paths = [folder / "ca.pem", folder / "cert.pem", folder / "key.pem"]
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(cert.public_bytes(pem))
    paths[2].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return paths


@pytest.fixture
def tls_server(tmp_path):
    """start(self_signed) -> the https:// address of a real TLS server on 127.0.0.1 serving /a.png."""
    import ssl

    started = []

    def start(self_signed: bool = False) -> str:
        ca, cert, key = tls_files(tmp_path, self_signed=self_signed)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        s.socket = ctx.wrap_socket(s.socket, server_side=True)
        threading.Thread(target=s.serve_forever, daemon=True).start()
        started.append(s)
        return f"https://127.0.0.1:{s.server_address[1]}"

    Handler.files = {**Handler.files, "/a.png": png()}
    yield start, tmp_path / "ca.pem"
    for s in started:
        s.shutdown()


def test_https_is_read_over_tls_and_the_certificate_is_verified(tls_server, monkeypatch):
    start, ca = tls_server
    monkeypatch.setenv(http_reader.ALLOW_ENV, "127.0.0.1/32")
    url = start()
    with pytest.raises(ImageError, match="TLS certificate refused"):
        read_bytes(f"{url}/a.png")  # the test CA is not among the system's
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    assert read_bytes(f"{url}/a.png") == png()


def test_a_self_signed_certificate_is_refused(tls_server, monkeypatch):
    start, ca = tls_server
    monkeypatch.setenv(http_reader.ALLOW_ENV, "127.0.0.1/32")
    url = start(self_signed=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # a CA, but not the one that signed it
    with pytest.raises(ImageError, match="TLS certificate refused"):
        read_bytes(f"{url}/a.png")


def test_https_to_a_plain_http_server_is_not_read(servers, monkeypatch):
    a, _ = servers
    monkeypatch.setenv(http_reader.ALLOW_ENV, "127.0.0.1/32")
    with pytest.raises(ImageError, match="cannot fetch"):
        read_bytes(a.replace("http://", "https://") + "/a.png")


def test_the_total_deadline_cuts_a_dripping_server(servers, monkeypatch):
    a, _ = servers
    monkeypatch.setenv(http_reader.ALLOW_ENV, "127.0.0.1/32")
    monkeypatch.setattr(http_reader, "TOTAL_TIMEOUT_S", 1.0)
    start = time.monotonic()
    with pytest.raises(ImageError, match=r"too slow: not read within 1 s"):
        read_bytes(f"{a}/drip.png")  # one byte every 0.2 s, 40 bytes: 8 s if not cut
    assert time.monotonic() - start < 2.5


def test_a_redirect_out_of_http_is_refused(servers, monkeypatch):
    a, _ = servers
    monkeypatch.setenv(http_reader.ALLOW_ENV, "127.0.0.1/32")
    with pytest.raises(ImageError, match="refused: a redirect to ftp://"):
        read_bytes(f"{a}/to-ftp.png")  # urllib alone would follow it (it refuses file:// itself)


def test_addresses_that_are_not_global_are_refused(monkeypatch):
    monkeypatch.delenv(http_reader.ALLOW_ENV, raising=False)
    for host in ("100.64.0.1", "100.100.100.200", "[::ffff:100.64.0.1]", "198.18.0.1", "192.0.0.170"):
        with pytest.raises(ImageError, match=f"refused: {host.strip('[]')} is "):
            read_bytes(f"http://{host}/x.png")  # refused before any connection is tried
    assert http_reader.refusal(ipaddress.ip_address("8.8.8.8")) is None


def test_only_the_schemes_petal_means_are_read(servers, tmp_path, monkeypatch):
    """ftp:// and webhdfs:// would skip the address check; local:// and zip://...::file:// would reach
    local files from a remote CSV. None is read, from any CSV or the command line."""
    a, _ = servers
    monkeypatch.setenv(http_reader.ALLOW_ENV, "127.0.0.1/32")
    zipped = tmp_path / "x.zip"
    import zipfile

    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("a.png", png())
    hostile = ["ftp://127.0.0.2:2121/f.png", "webhdfs://127.0.0.2:8802/f.png", "local:///etc/hosts",
               f"zip://a.png::file://{zipped}", "gs://bucket/a.png::file:///etc/hosts"]
    for uri in hostile:
        with pytest.raises(ImageError, match=r"URIs are not read|chained URIs \(A::B\) are not read"):
            read_bytes(uri)
    (tmp_path / "rows.csv").write_text("uri,label\n" + "".join(f"{u},red\n" for u in hostile) + f"{a}/a.png,red\n")
    Handler.files["/hostile.csv"] = (tmp_path / "rows.csv").read_bytes()
    for source in (str(tmp_path / "rows.csv"), f"{a}/hostile.csv"):
        ds = load_dataset(source, eval_percent=0, require_train=False)
        assert [e.uri for e in ds.examples] == [f"{a}/a.png"]
        reasons = list(dict(ds.skipped).values())
        assert len(reasons) == len(hostile) and all("are not read" in r for r in reasons), reasons
