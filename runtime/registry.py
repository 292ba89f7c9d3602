"""The OCI distribution protocol, as much as pull and push need: manifests, blobs, auth.

Written on `http.client` rather than the oras-py SDK, for reasons measured here: importing
`oras.provider` takes 290 ms (requests, jsonschema), more than the whole 50 ms budget of
a cache hit that resolves a tag; its requests carry no timeout; its retry decorator
sleeps 3 + 5 + 11 + 29 + 83 s before a 500 or an unreachable registry is reported; and
its upload reads the whole blob into memory. oras-py stays the interoperability peer in
the tests (it pushes what we pull and pulls what we push).

Auth: anonymous, then what the registry asks for: `Basic` with the user's credentials,
or `Bearer` tokens from the realm it names (Docker Hub, Harbor, GitLab…), fetched with
those credentials when there are some. Credentials come from `--username`/
`--password-stdin`, `RANKWIRE_DOCKER_USERNAME`/`_PASSWORD`, or the Docker config file
(`$DOCKER_CONFIG/config.json`, `~/.docker/config.json`), in that order.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import socket
import ssl
import urllib.parse
from pathlib import Path
from typing import BinaryIO, Callable, Mapping, Optional, Sequence

from rankwire.errors import UserError, shown
from rankwire.runtime.reference import DOCKER_HUB, Access, Reference

CHUNK = 1 << 20
_CHALLENGE = re.compile(r'(\w+)="([^"]*)"')


def credentials(
    ref: Reference, access: Access, environ: Mapping[str, str], home: str
) -> Optional[tuple[str, str]]:
    """(user, password) for `ref`'s registry, or None: anonymous."""
    if access.username is not None:
        return access.username, access.password or ""
    user = environ.get("RANKWIRE_DOCKER_USERNAME")
    if user:
        return user, environ.get("RANKWIRE_DOCKER_PASSWORD", "")
    config = Path(environ.get("DOCKER_CONFIG") or f"{home}/.docker") / "config.json"
    try:
        auths = json.loads(config.read_text()).get("auths", {})
    except (OSError, ValueError, AttributeError):
        return None
    keys = [ref.registry, f"https://{ref.registry}", f"http://{ref.registry}"]
    if ref.registry == DOCKER_HUB:
        keys.insert(0, "https://index.docker.io/v1/")
    for key in keys:
        entry = auths.get(key) if isinstance(auths, dict) else None
        encoded = entry.get("auth") if isinstance(entry, dict) else None
        if isinstance(encoded, str):
            try:
                user, _, password = base64.b64decode(encoded).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                continue
            return user, password
    return None


class Client:
    """One registry, one repository; remembers the auth header that worked."""

    def __init__(self, ref: Reference, access: Access, creds: Optional[tuple[str, str]]) -> None:
        self.ref = ref
        self.access = access
        self.creds = creds
        self.scheme = "http" if access.insecure else "https"
        self.auth: Optional[str] = None
        self._context: Optional[ssl.SSLContext] = None

    # -- transport ---------------------------------------------------------------------

    def _ssl(self) -> ssl.SSLContext:
        if self._context is None:
            try:
                self._context = ssl.create_default_context(cafile=self.access.ca_cert)
            except (OSError, ssl.SSLError) as err:
                raise UserError(
                    f"--ca-cert {shown(self.access.ca_cert)}: {err}; give a PEM CA bundle"
                ) from None
        return self._context

    def _where(self) -> str:
        return f"registry {shown(self.ref.registry)}"

    def _open(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: Optional[BinaryIO | bytes] = None,
    ) -> http.client.HTTPResponse:
        """One request, following redirects (without our auth header to another host)."""
        for _ in range(6):
            parts = urllib.parse.urlsplit(url)
            conn: http.client.HTTPConnection
            if parts.scheme == "https":
                conn = http.client.HTTPSConnection(
                    parts.netloc, timeout=self.access.timeout, context=self._ssl()
                )
            else:
                conn = http.client.HTTPConnection(parts.netloc, timeout=self.access.timeout)
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            try:
                conn.request(method, path, body=body, headers=dict(headers))
                resp = conn.getresponse()
            except ssl.SSLCertVerificationError as err:
                conn.close()
                raise UserError(
                    f"{self._where()}: TLS certificate not trusted ({err.verify_message}); "
                    "give its CA with --ca-cert, or --insecure for a plain-HTTP registry"
                ) from None
            except ssl.SSLError as err:
                conn.close()
                raise UserError(
                    f"{self._where()}: TLS failed ({err.reason}); if it speaks plain HTTP, "
                    "add --insecure"
                ) from None
            except (socket.timeout, TimeoutError):
                conn.close()
                raise UserError(
                    f"{self._where()} did not answer within {self.access.timeout:g} s; "
                    "check it is up, or raise RANKWIRE_PULL_TIMEOUT"
                ) from None
            except (OSError, http.client.HTTPException) as err:
                conn.close()
                reason = err.strerror if isinstance(err, OSError) and err.strerror else err
                raise UserError(
                    f"cannot reach {self._where()} ({shown(reason)}); check the address "
                    "and that it is up"
                ) from None
            if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
                target = urllib.parse.urljoin(url, resp.getheader("Location", ""))
                resp.close()
                conn.close()
                if urllib.parse.urlsplit(target).netloc != parts.netloc:
                    headers = {k: v for k, v in headers.items() if k != "Authorization"}
                url = target
                if resp.status == 303:
                    method, body = "GET", None
                continue
            return resp
        raise UserError(f"{self._where()} redirected more than 5 times; check the registry")

    def _url(self, path: str) -> str:
        return f"{self.scheme}://{self.ref.api_host}/v2/{self.ref.repository}/{path}"

    def request(
        self,
        method: str,
        url: str,
        headers: Optional[Mapping[str, str]] = None,
        body: Optional[bytes | Path] = None,
        ok: Sequence[int] = (200,),
        what: str = "",
    ) -> http.client.HTTPResponse:
        """A request with auth; a status outside `ok` is a UserError naming `what`."""
        headers = dict(headers or {})
        for attempt in range(2):
            if self.auth:
                headers["Authorization"] = self.auth
            if isinstance(body, Path):
                headers["Content-Length"] = str(body.stat().st_size)
                with body.open("rb") as f:
                    resp = self._open(method, url, headers, f)
            else:
                resp = self._open(method, url, headers, body)
            if resp.status != 401 or attempt:
                break
            challenge = resp.getheader("WWW-Authenticate", "")
            resp.read()
            resp.close()
            if not self._authenticate(challenge):
                break
        if resp.status not in ok:
            self._fail(resp, what)
        return resp

    def _authenticate(self, challenge: str) -> bool:
        """Set `self.auth` from a 401's challenge; False when there is nothing to try."""
        scheme = challenge.split(" ", 1)[0].lower()
        params = dict(_CHALLENGE.findall(challenge))
        basic = None
        if self.creds:
            raw = f"{self.creds[0]}:{self.creds[1]}".encode()
            basic = "Basic " + base64.b64encode(raw).decode()
        if scheme == "basic":
            if basic is None or self.auth == basic:
                return False
            self.auth = basic
            return True
        if scheme != "bearer" or "realm" not in params:
            return False
        query = {k: v for k, v in params.items() if k in ("service", "scope")}
        if "scope" not in query:
            query["scope"] = f"repository:{self.ref.repository}:pull"
        url = params["realm"] + "?" + urllib.parse.urlencode(query)
        resp = self._open("GET", url, {"Authorization": basic} if basic else {})
        data = resp.read(1 << 20)
        resp.close()
        if resp.status != 200:
            return False
        try:
            answer = json.loads(data)
            token = answer.get("token") or answer.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str):
            return False
        self.auth = f"Bearer {token}"
        return True

    def _fail(self, resp: http.client.HTTPResponse, what: str) -> None:
        status = f"{resp.status} {resp.reason}"
        try:
            errors = json.loads(resp.read(65536)).get("errors") or []
            detail = errors[0].get("message", "") if errors else ""
        except (ValueError, AttributeError, OSError, http.client.HTTPException):
            detail = ""
        resp.close()
        said = f" ({shown(detail)})" if detail else ""
        if resp.status in (401, 403):
            raise UserError(
                f"{self._where()} refused access to {shown(what)}: {status}{said}; give "
                "credentials with --username and --password-stdin, RANKWIRE_DOCKER_USERNAME/"
                "_PASSWORD or ~/.docker/config.json"
            )
        if resp.status == 404:
            raise UserError(
                f"{shown(what)} not found in {self._where()} ({status}); check the repository, "
                "tag or digest"
            )
        if resp.status >= 500:
            raise UserError(
                f"{self._where()} failed on {shown(what)}: {status}{said}; try again later "
                "or tell the registry's admins"
            )
        raise UserError(f"{self._where()} answered {status}{said} for {shown(what)}")

    # -- the protocol -----------------------------------------------------------------

    def manifest(self, reference: str, accept: Sequence[str], cap: int) -> tuple[bytes, str, str]:
        """(body, media type, digest) of a manifest or index; the digest is checked when
        `reference` is one."""
        what = f"{self.ref.repository}:{reference}" if ":" not in reference else str(self.ref)
        resp = self.request(
            "GET", self._url(f"manifests/{reference}"), {"Accept": ", ".join(accept)}, what=what
        )
        body = resp.read(cap + 1)
        resp.close()
        if len(body) > cap:
            raise UserError(
                f"the manifest of {shown(self.ref)} is over {cap // 1024} KiB; that is not an "
                "image manifest (check the reference)"
            )
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise UserError(
                f"the manifest of {shown(self.ref)} has digest {digest}, not {reference}; the "
                "registry served other content: do not use it"
            )
        media_type = (resp.getheader("Content-Type") or "").split(";")[0].strip()
        return body, media_type, digest

    def fetch_blob(
        self,
        digest: str,
        size: int,
        dest: BinaryIO,
        progress: Callable[[int], None] = lambda _n: None,
    ) -> None:
        """Stream blob `digest` into `dest`, checking its size and digest as it comes."""
        resp = self.request("GET", self._url(f"blobs/{digest}"), what=f"blob {digest}")
        hasher = hashlib.sha256()
        got = 0
        try:
            while True:
                chunk = resp.read(CHUNK)
                if not chunk:
                    break
                got += len(chunk)
                if got > size:
                    raise UserError(
                        f"blob {digest[:19]} of {shown(self.ref)} is larger than the {size} "
                        "bytes its manifest says; the registry's content is wrong"
                    )
                hasher.update(chunk)
                dest.write(chunk)
                progress(len(chunk))
        except (socket.timeout, TimeoutError):
            raise UserError(
                f"{self._where()} stalled sending blob {digest[:19]} for "
                f"{self.access.timeout:g} s; try again, or raise RANKWIRE_PULL_TIMEOUT"
            ) from None
        except (OSError, http.client.HTTPException) as err:
            raise UserError(
                f"{self._where()} broke off blob {digest[:19]} ({shown(err)}); try again"
            ) from None
        finally:
            resp.close()
        if got != size:
            raise UserError(
                f"blob {digest[:19]} of {shown(self.ref)} is truncated: {got} of {size} bytes; "
                "try again"
            )
        if "sha256:" + hasher.hexdigest() != digest:
            raise UserError(
                f"blob {digest[:19]} of {shown(self.ref)} does not match its digest "
                f"(got sha256:{hasher.hexdigest()[:12]}); the registry's content is corrupt"
            )

    def has_blob(self, digest: str) -> bool:
        resp = self.request("HEAD", self._url(f"blobs/{digest}"), ok=(200, 404), what=digest)
        resp.read()
        resp.close()
        return resp.status == 200

    def push_blob(self, data: bytes | Path, digest: str) -> None:
        """Upload `data` (a file's content streams) as blob `digest` (POST, then one PUT),
        unless the registry has it."""
        if self.has_blob(digest):
            return
        what = f"an upload to {self.ref.repository}"
        resp = self.request("POST", self._url("blobs/uploads/"), ok=(202,), body=b"", what=what)
        resp.read()
        resp.close()
        location = urllib.parse.urljoin(self._url(""), resp.getheader("Location") or "")
        sep = "&" if "?" in location else "?"
        url = f"{location}{sep}digest={urllib.parse.quote(digest)}"
        headers = {"Content-Type": "application/octet-stream"}
        resp = self.request("PUT", url, headers, body=data, ok=(201,), what=what)
        resp.read()
        resp.close()

    def push_manifest(self, body: bytes, media_type: str, tag: str) -> None:
        headers = {"Content-Type": media_type}
        url = self._url(f"manifests/{tag}")
        what = f"{self.ref.repository}:{tag}"
        resp = self.request("PUT", url, headers, body=body, ok=(201,), what=what)
        resp.read()
        resp.close()


def client(ref: Reference, access: Access) -> Client:
    """A client for `ref` with the caller's credentials (see the module's docstring)."""
    home = os.environ.get("HOME") or os.path.expanduser("~")
    return Client(ref, access, credentials(ref, access, os.environ, home))
