"""The nginx example (deploy/nginx-uvm-compute.conf) with TLS in front of a server: a Chromium
volunteer completes a job through it, the server sees the browser's address (not nginx's), and the
session cookie is ``Secure``.

nginx runs as a child process (``daemon off``) with its own prefix and a free port; its certificate
is made here. nginx connects to the server from 127.0.0.2 (``proxy_bind``), the browser from
127.0.0.1, so the two addresses can be told apart.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import shutil
import ssl
import subprocess
import time
import types
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from e2e.conftest import ROOT, _cli, fake_device, free_port, open_volunteer_page, wait_state

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
EXAMPLE = ROOT / "deploy" / "nginx-uvm-compute.conf"
PROXY_ADDRESS = "127.0.0.2"
CODE = "def main(x):\n    return x * 3\n"


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def render(upstream_port: int, port: int, cert: Path, key: Path) -> str:
    """The example as shipped, pointed at this test's server, port and certificate."""
    text = EXAMPLE.read_text()
    text = text.replace("server 127.0.0.1:8080;", f"server 127.0.0.1:{upstream_port};")
    text = text.replace("listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;")
    text = re.sub(r"ssl_certificate\s+\S+;", f"ssl_certificate {cert};", text)
    text = re.sub(r"ssl_certificate_key\s+\S+;", f"ssl_certificate_key {key};", text)
    text = text.replace("listen 80;", f"listen 127.0.0.1:{free_port()};")
    text = text.replace(
        "proxy_pass http://uvm_compute;", f"proxy_pass http://uvm_compute;\n        proxy_bind {PROXY_ADDRESS};"
    )
    assert text.count(str(upstream_port)) == 1 and f"proxy_bind {PROXY_ADDRESS}" in text
    return text


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Callable[[int], str]]:
    procs: list[subprocess.Popen] = []

    def start(upstream_port: int, port: int | None = None) -> str:
        prefix = tmp_path / "nginx"
        prefix.mkdir()
        cert, key = self_signed(prefix)
        port = port or free_port()
        (prefix / "site.conf").write_text(render(upstream_port, port, cert, key))
        temp = "\n".join(
            f"    {kind}_temp_path {prefix / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (prefix / "nginx.conf").write_text(
            f"""{"user root;" if os.geteuid() == 0 else ""}
daemon off;
worker_processes 1;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} info;
events {{ worker_connections 256; }}
http {{
    access_log {prefix / "access.log"};
{temp}
    include {prefix / "site.conf"};
}}
"""
        )
        proc = subprocess.Popen(
            [NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        procs.append(proc)
        url = f"https://127.0.0.1:{port}"
        end = time.monotonic() + 20
        while time.monotonic() < end:
            assert proc.poll() is None, (prefix / "error.log").read_text()[-2000:]
            try:
                with _open(url + "/api/health") as resp:
                    if resp.status == 200:
                        return url
            except OSError:
                time.sleep(0.1)
        raise AssertionError("nginx did not answer")

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


def _open(url: str, data: bytes | None = None, headers: dict | None = None):  # noqa: ANN202
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return urllib.request.urlopen(
        urllib.request.Request(url, data=data, headers=headers or {}), context=context, timeout=10
    )


def test_volunteer_through_nginx_with_tls(browser, live_server, nginx) -> None:
    port = free_port()  # nginx's: the public origin, which the workers' CSP and CSRF checks name
    server = live_server("sqlite", UVM_TRUSTED_PROXIES=PROXY_ADDRESS, UVM_PUBLIC_URL=f"https://127.0.0.1:{port}")
    public = nginx(int(server.url.rsplit(":", 1)[1]), port)
    email = f"ops-{uuid.uuid4().hex[:6]}@example.org"
    operator = _cli(server.env, "researcher", "add", email, "--operator", "--password-stdin", stdin="operator-pass\n")
    operator_token = operator.strip().splitlines()[-1]

    job = server.submit(CODE, list(range(30)), name="through-nginx", timeout=20)
    context = browser.new_context(ignore_https_errors=True)
    context.add_init_script(fake_device(cores=2))
    page = open_volunteer_page(context, types.SimpleNamespace(url=public))
    assert page.url.startswith("https://")
    page.get_by_role("button", name="Start").click()
    done = server.wait(job, timeout=90, page=page)
    assert done["state"] == "done", done
    assert [r["result"] for r in server.results(job)] == [3 * x for x in range(30)]
    wait_state(page, lambda s: s["session"]["tasks"] == 30 and not s["unacked"])

    # The server saw the browser's address through nginx's X-Forwarded-For, not nginx's own.
    req = urllib.request.Request(
        server.url + "/api/admin/volunteers", headers={"Authorization": f"Bearer {operator_token}"}
    )
    with urllib.request.urlopen(req) as resp:
        connected = json.loads(resp.read())["connected"]
    assert [c["address"] for c in connected] == ["127.0.0.1"], connected

    # Signing in through TLS sets a Secure cookie.
    response = context.request.post(
        public + "/api/login", data={"email": email, "password": "operator-pass"}, headers={"Origin": public}
    )
    assert response.status == 200, response.text()
    cookie = next(c for c in context.cookies() if c["name"] == "uvm_session")
    assert cookie["secure"] is True and cookie["httpOnly"] is True
    direct = urllib.request.Request(
        server.url + "/api/login",
        data=b'{"email": "%s", "password": "operator-pass"}' % email.encode(),
        headers={"Content-Type": "application/json", "Origin": public},
    )
    with urllib.request.urlopen(direct) as resp:
        set_cookie = resp.headers["Set-Cookie"]
    # The public origin is https, so the cookie is Secure even on a direct plain-HTTP sign-in: a
    # browser never sends it back over plain HTTP.
    assert "uvm_session=" in set_cookie and "secure" in set_cookie.lower()
    context.close()
