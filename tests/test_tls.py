"""HTTPS as XO speaks it (bare tag) and plain HTTP (URL tag), on one port."""

import os
import re
import socket
import shutil
import ssl
import sys

import pytest

from conftest import client_context, run, SYNCHOOK


def served_cert(d):
    return ssl.get_server_certificate(("127.0.0.1", d.port))


def test_auto_speaks_https_and_http_on_one_port(start, rec):
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"))
    assert d.get("/sync", tls=True) == (200, "Ok")        # bare tag: HTTPS
    assert d.get("/post-sync", tls=False) == (200, "Ok")  # URL tag http://
    assert rec.lines() == ["sync", "post"]


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
def test_tls_versions_accepted(start, version):
    d = start("--sync", "true")
    context = client_context()
    context.minimum_version = context.maximum_version = getattr(ssl.TLSVersion, version)
    import http.client
    conn = http.client.HTTPSConnection("127.0.0.1", d.port, timeout=10, context=context)
    conn.request("GET", "/status")
    assert conn.getresponse().status == 200
    assert conn.sock.version() == version.replace("_", ".")
    conn.close()


def test_old_tls_refused(start, rec):
    d = start("--sync", rec.cmd("sync"))
    context = client_context()
    try:
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        context.maximum_version = ssl.TLSVersion.TLSv1_1
        context.set_ciphers("ALL:@SECLEVEL=0")
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")
    import http.client
    conn = http.client.HTTPSConnection("127.0.0.1", d.port, timeout=10, context=context)
    with pytest.raises((ssl.SSLError, OSError)):
        conn.request("GET", "/sync")
        conn.getresponse()
    assert rec.lines() == []


def test_curl_k(start, rec):
    if shutil.which("curl") is None:
        pytest.skip("curl not installed (apt-get install curl)")
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"))
    out = run(["curl", "-sk", "https://127.0.0.1:%d/sync" % d.port])
    assert out.stdout == "Ok\n"
    out = run(["curl", "-s", "http://127.0.0.1:%d/post-sync" % d.port])
    assert out.stdout == "Ok\n"
    assert rec.lines() == ["sync", "post"]


NODE_XO = r"""
// What XO does: fetch (undici) with certificate checks off, keep-alive, body discarded.
process.env.NODE_TLS_REJECT_UNAUTHORIZED = '0'
const https = require('node:https')
const base = process.argv[2]
async function main () {
  for (const path of ['/sync', '/post-sync']) {
    const res = await fetch(base + path)
    console.log(path, res.status, (await res.text()).trim())
  }
  // and node:https with rejectUnauthorized: false, as XO's docs' server would be called
  await new Promise((resolve, reject) => {
    https.get(base + '/status', { rejectUnauthorized: false }, res => {
      res.resume(); console.log('/status', res.statusCode); res.on('end', resolve)
    }).on('error', reject)
  })
}
main().catch(e => { console.error(e); process.exit(1) })
"""


def test_node_fetch_like_xo(start, rec, tmp_path):
    if shutil.which("node") is None:
        pytest.skip("node not installed (apt-get install nodejs)")
    script = tmp_path / "xo.js"
    script.write_text(NODE_XO)
    d = start("--sync", rec.cmd("sync"), "--post-sync", rec.cmd("post"))
    out = run(["node", str(script), "https://127.0.0.1:%d" % d.port])
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["/sync 200 Ok", "/post-sync 200 Ok", "/status 200"]
    assert rec.lines() == ["sync", "post"]


def test_on_refuses_plain_http(start, rec):
    d = start("--tls", "on", "--sync", rec.cmd("sync"))
    status, body = d.get("/sync")
    assert (status, body) == (400, "this port speaks HTTPS only")
    assert d.get("/sync", tls=True) == (200, "Ok")
    assert rec.lines() == ["sync"]


def test_off_refuses_tls(start, rec):
    d = start("--tls", "off", "--sync", rec.cmd("sync"))
    with pytest.raises((ssl.SSLError, OSError)):
        d.get("/sync", tls=True, timeout=5)
    assert d.get("/sync") == (200, "Ok")
    assert rec.lines() == ["sync"]


def test_generated_certificate_kept_and_reused(start, tmp_path):
    state = tmp_path / "fresh"
    d = start("--sync", "true", state_dir=state)
    first = served_cert(d)
    assert oct(os.stat(str(state / "key.pem")).st_mode & 0o777) == "0o600"
    d.stop()
    d2 = start("--sync", "true", state_dir=state)
    assert served_cert(d2) == first
    assert "generated" not in d2.log()


def test_corrupt_certificate_replaced_with_warning(start, tmp_path):
    state = tmp_path / "broken"
    state.mkdir()
    (state / "cert.pem").write_text("not a certificate")
    (state / "key.pem").write_text("nor a key")
    d = start("--sync", "true", state_dir=state)
    d.wait_log(r"warning: stored certificate .* unusable")
    assert d.get("/status", tls=True)[0] == 200
    assert "BEGIN CERTIFICATE" in (state / "cert.pem").read_text()


def test_unwritable_state_dir_uses_certificate_for_this_run(start, tmp_path):
    d = start("--sync", "true", state_dir="/proc/synchook-cannot-exist")
    d.wait_log(r"for this run only")
    assert d.get("/status", tls=True)[0] == 200
    assert not [f for f in os.listdir(d.runtime) if f.endswith(".pem")]


def test_given_certificate_is_used(start, tmp_path, shared_cert):
    d = start("--tls-cert", str(shared_cert / "cert.pem"), "--tls-key",
              str(shared_cert / "key.pem"), state_dir=tmp_path / "unused")
    assert ssl.PEM_cert_to_DER_cert(served_cert(d)) == ssl.PEM_cert_to_DER_cert(
        (shared_cert / "cert.pem").read_text())
    assert not (tmp_path / "unused").exists()


def test_bad_given_certificate_exits_2(tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("garbage")
    out = run([sys.executable, SYNCHOOK, "--tls-cert", str(bad), "--tls-key", str(bad),
               "--runtime-dir", str(tmp_path / "r"), "--port", "0"])
    assert out.returncode == 2 and "cannot load" in out.stderr


def test_generated_certificate_is_well_formed(shared_cert):
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    cert = x509.load_pem_x509_certificate((shared_cert / "cert.pem").read_bytes())
    key = serialization.load_pem_private_key((shared_cert / "key.pem").read_bytes(), None)
    assert cert.version == x509.Version.v3
    assert key.curve.name == "secp256r1"
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    cert.public_key().verify(cert.signature, cert.tbs_certificate_bytes,
                             ec.ECDSA(hashes.SHA256()))              # raises if bad
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_without_ssl_module_serves_plain_http(start, tmp_path, rec):
    wrapper = tmp_path / "nossl.py"
    wrapper.write_text("import sys, runpy\nsys.modules['ssl'] = None\n"
                       "sys.argv[0] = %r\nrunpy.run_path(%r, run_name='__main__')\n"
                       % (SYNCHOOK, SYNCHOOK))
    import conftest
    original = conftest.SYNCHOOK
    conftest.SYNCHOOK = str(wrapper)
    try:
        d = start("--sync", rec.cmd("sync"))
    finally:
        conftest.SYNCHOOK = original
    d.wait_log(r"no ssl module: serving plain HTTP only")
    assert d.get("/sync") == (200, "Ok")
    out = run([sys.executable, str(wrapper), "--tls", "on"])
    assert out.returncode == 2 and "no ssl module" in out.stderr


def test_existing_rsa_certificate_in_state_dir_keeps_working(start, tmp_path):
    """Certificates made by 1.0.0 (RSA-2048) stay in use after an upgrade."""
    pytest.importorskip("cryptography.x509")
    import datetime
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "old synchook")])
    now = datetime.datetime.utcnow()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(7).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=9)).sign(key, hashes.SHA256()))
    state = tmp_path / "rsa-state"
    state.mkdir(mode=0o700)
    (state / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (state / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    os.chmod(str(state / "key.pem"), 0o600)
    d = start("--sync", "true", state_dir=state)
    assert d.get("/sync", tls=True) == (200, "Ok")
    assert "generated" not in d.log()
    with socket.create_connection(("127.0.0.1", d.port)) as sock:
        with client_context().wrap_socket(sock) as tls:
            served = tls.getpeercert(binary_form=True)
    assert served == cert.public_bytes(serialization.Encoding.DER)


def test_first_start_generates_a_key_in_milliseconds(start, tmp_path):
    d = start("--sync", "true", state_dir=tmp_path / "fresh-state")
    match = re.search(r"generated a self-signed ECDSA P-256 certificate in ([0-9.]+) s", d.log())
    assert match, d.log()
    print("key and certificate made in %s s" % match.group(1))
    assert d.get("/sync", tls=True) == (200, "Ok")
