"""A throwaway OCI registry for tests: Debian's CNCF distribution (`docker-registry`).

Plain HTTP, TLS with a CA made here (openssl CLI), or htpasswd basic auth; storage, config,
certificates and log under one directory it creates in the caller's `workdir` and removes
after. The registry dies with the thread that started it (PR_SET_PDEATHSIG), so a test
process killed with SIGKILL leaves no registry behind.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REGISTRY_BIN = "/usr/bin/docker-registry"
PR_SET_PDEATHSIG = 1
START_TIMEOUT = 15.0
# Access-log lines (gorilla's combined format, on the registry's stdout):
#   127.0.0.1 - - [date] "GET /v2/REPO/blobs/sha256:HEX HTTP/1.1" 200 1234 "" "agent"
_BLOB_GET = re.compile(r'"GET /v2/\S+/blobs/(sha256:[0-9a-f]{64}) HTTP/[0-9.]+" (\d{3}) ')


class RegistryError(RuntimeError):
    pass


@dataclass(frozen=True)
class Registry:
    host: str
    port: int
    url: str  # http(s)://HOST:PORT
    netloc: str  # HOST:PORT, as in docker://HOST:PORT/REPO:TAG
    log: Path  # stdout (access log) and stderr (registry log) of the registry
    storage: Path  # storage.filesystem.rootdirectory
    ca_cert: Optional[Path]  # the CA that signed the server certificate (TLS only)
    credentials: Optional[tuple[str, str]]  # htpasswd user and password (auth only)
    pid: int

    @property
    def cert_dir(self) -> Optional[Path]:
        """A directory holding only `ca.crt`: skopeo's --cert-dir, Docker's certs.d layout."""
        return self.ca_cert.parent if self.ca_cert else None

    def blob_gets(self, digest: Optional[str] = None) -> int:
        """How many `GET /v2/…/blobs/sha256:…` requests (of `digest`, if given) the
        registry has logged, whatever their status (HEAD requests are not counted)."""
        text = self.log.read_text(errors="replace")
        return sum(1 for m in _BLOB_GET.finditer(text) if digest is None or m.group(1) == digest)

    def manifest_gets(self, repo: str) -> int:
        """How many `GET /v2/REPO/manifests/…` requests the registry has logged."""
        text = self.log.read_text(errors="replace")
        return text.count(f'"GET /v2/{repo}/manifests/')

    def ssl_context(self) -> Optional[ssl.SSLContext]:
        return ssl.create_default_context(cafile=str(self.ca_cert)) if self.ca_cert else None

    def request(
        self,
        method: str,
        path: str,
        data: Optional[bytes] = None,
        headers: Optional[Mapping[str, str]] = None,
        *,
        auth: bool = True,
    ) -> tuple[int, dict[str, str], bytes]:
        """One HTTP request to `url + path` with urllib (basic auth when the registry has
        credentials and `auth`); returns (status, headers, body), errors included."""
        req = urllib.request.Request(self.url + path, data=data, method=method)
        for key, value in (headers or {}).items():
            req.add_header(key, value)
        if auth and self.credentials:
            token = base64.b64encode(":".join(self.credentials).encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(req, timeout=30, context=self.ssl_context()) as resp:
                return resp.status, dict(resp.headers.items()), resp.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers.items()), err.read()

    def skopeo_flags(self, prefix: str = "") -> list[str]:
        """TLS and credential flags of skopeo for this registry; `prefix` is "src-" or
        "dest-" for `skopeo copy`, "" for `skopeo inspect`."""
        if self.ca_cert:
            flags = [f"--{prefix}tls-verify=true", f"--{prefix}cert-dir={self.cert_dir}"]
        else:
            flags = [f"--{prefix}tls-verify=false"]
        if self.credentials:
            flags.append(f"--{prefix}creds={':'.join(self.credentials)}")
        return flags


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL when the thread that forked us exits (PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def _openssl(*args: str, cwd: Path) -> None:
    out = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RegistryError(f"openssl {args[0]} failed: {out.stderr.strip()}")


def make_tls(root: Path, host: str) -> tuple[Path, Path, Path]:
    """A throwaway CA (`ca/ca.crt`, the CA key deleted once used) and a server certificate
    for `host` (an IP SAN, plus 127.0.0.1) it signed; returns (ca.crt, server.crt, key)."""
    ca_dir, tls = root / "ca", root / "tls"
    ca_dir.mkdir(mode=0o755)
    tls.mkdir(mode=0o700)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca_ext = ["basicConstraints=critical,CA:TRUE", "keyUsage=critical,keyCertSign,cRLSign"]
    _openssl(
        "req",
        "-x509",
        *ec,
        "-days",
        "2",
        "-subj",
        "/CN=rankwire test CA",
        *[arg for ext in ca_ext for arg in ("-addext", ext)],
        "-keyout",
        "ca.key",
        "-out",
        str(ca_dir / "ca.crt"),
        cwd=tls,
    )
    _openssl(
        "req",
        "-new",
        *ec,
        "-subj",
        f"/CN={host}",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        cwd=tls,
    )
    sans = ",".join(f"IP:{ip}" for ip in dict.fromkeys((host, "127.0.0.1")))
    (tls / "ext.cnf").write_text(
        f"subjectAltName={sans}\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        str(ca_dir / "ca.crt"),
        "-CAkey",
        "ca.key",
        "-CAserial",
        "ca.srl",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "server.crt",
        cwd=tls,
    )
    (tls / "ca.key").unlink()
    (ca_dir / "ca.crt").chmod(0o644)
    return ca_dir / "ca.crt", tls / "server.crt", tls / "server.key"


def make_htpasswd(path: Path, user: str, password: str) -> None:
    out = subprocess.run(["htpasswd", "-Bbn", user, password], capture_output=True, text=True)
    if out.returncode != 0:
        raise RegistryError(f"htpasswd failed: {out.stderr.strip()}")
    path.write_text(out.stdout)
    path.chmod(0o644)


def _config(
    root: Path, addr: str, tls: Optional[tuple[Path, Path]], htpasswd: Optional[Path]
) -> str:
    """config.yml (version 0.1) as text; every value is a path or address we made (no
    quoting needed: JSON strings are YAML)."""
    lines = [
        "version: 0.1",
        "log:",
        "  level: info",
        "  accesslog:",
        "    disabled: false",
        "storage:",
        "  filesystem:",
        f'    rootdirectory: "{root / "storage"}"',
        "  delete:",
        "    enabled: true",
        "http:",
        f'  addr: "{addr}"',
        "  secret: rankwire-test-secret",
        "  headers:",
        "    X-Content-Type-Options: [nosniff]",
    ]
    if tls:
        lines += ["  tls:", f'    certificate: "{tls[0]}"', f'    key: "{tls[1]}"']
    if htpasswd:
        lines += ["auth:", "  htpasswd:", "    realm: rankwire-test", f'    path: "{htpasswd}"']
    return "\n".join(lines) + "\n"


def _answers(reg: Registry) -> bool:
    """`/v2/` answers 200 (or 401 behind auth) — the registry is up."""
    try:
        status = reg.request("GET", "/v2/", auth=False)[0]
    except (OSError, ssl.SSLError):
        return False
    return status in (200, 401)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def _start(
    root: Path, host: str, tls: Optional[tuple[Path, Path]], htpasswd: Optional[Path]
) -> tuple[subprocess.Popen[bytes], int]:
    """Start on a free port of `host`; a port taken between the probe and the bind is
    retried with another."""
    log = root / "registry.log"
    for _ in range(5):
        port = free_port(host)
        config = root / "config.yml"
        config.write_text(_config(root, f"{host}:{port}", tls, htpasswd))
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [REGISTRY_BIN, "serve", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # no terminal Ctrl-C: teardown stops it
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + 2
        while proc.poll() is None and time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex((host, port)) == 0:
                    return proc, port
            time.sleep(0.02)
        _stop(proc)
        if "address already in use" not in log.read_text(errors="replace"):
            break
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-10:])
    raise RegistryError(f"docker-registry did not start:\n{tail}")


@contextlib.contextmanager
def running_registry(
    workdir: Path,
    *,
    tls: bool = False,
    htpasswd: Optional[tuple[str, str]] = None,
    host: str = "127.0.0.1",
) -> Iterator[Registry]:
    """A running docker-registry on a free port of `host` (bound there only), all its
    files in a new directory under `workdir` (mode 0755: other test users read the CA);
    stopped (SIGTERM, SIGKILL after 5 s) and that directory removed on exit."""
    root = Path(tempfile.mkdtemp(prefix="registry-", dir=workdir))
    proc: Optional[subprocess.Popen[bytes]] = None
    try:
        root.chmod(0o755)
        ca_cert, certs = None, None
        if tls:
            ca_cert, cert, key = make_tls(root, host)
            certs = (cert, key)
        auth_file = None
        if htpasswd:
            auth_file = root / "htpasswd"
            make_htpasswd(auth_file, *htpasswd)
        proc, port = _start(root, host, certs, auth_file)
        netloc = f"{host}:{port}"
        reg = Registry(
            host=host,
            port=port,
            url=f"{'https' if tls else 'http'}://{netloc}",
            netloc=netloc,
            log=root / "registry.log",
            storage=root / "storage",
            ca_cert=ca_cert,
            credentials=htpasswd,
            pid=proc.pid,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not _answers(reg):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(reg.log.read_text(errors="replace").splitlines()[-10:])
                raise RegistryError(f"docker-registry at {reg.url} does not answer:\n{tail}")
            time.sleep(0.05)
        yield reg
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(root, ignore_errors=True)
