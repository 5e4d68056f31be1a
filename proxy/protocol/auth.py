"""Password authentication as pure functions: MD5 and SCRAM-SHA-256, both as server and as client.

pgshard is a server to its clients (psql, drivers) and a client to the PostgreSQL backends, so
both halves live here, sans-IO: the session moves the bytes (AuthenticationSASL,
SASLInitialResponse, SASLResponse, AuthenticationSASLContinue/Final, PostgreSQL protocol chapter
55.3.1 "SASL Authentication"), these classes compute them.

SCRAM follows RFC 5802 with SHA-256 (RFC 7677) as PostgreSQL implements it (`auth-scram.c`,
`fe-auth-scram.c`):
- no channel binding: gs2 header "n,," (client cannot bind) or "y,," (client could, but pgshard
  offers no SCRAM-SHA-256-PLUS, so that is honest); "p=..." and an authzid are refused;
- the username in client-first-message is ignored (libpq sends "n="): the start-up packet's
  user is the one authenticated;
- passwords are SASLprep'ed (RFC 4013) as `pg_saslprep` does: pure ASCII passes unchanged; a
  password that SASLprep rejects (prohibited characters, empty after mapping) is used as-is.

Every failure is an AuthError carrying the SQLSTATE PostgreSQL would send: 08P01 for a garbled
exchange, 28P01 for a wrong password. Nothing else escapes from parsing a peer's bytes.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import secrets
import stringprep
import unicodedata
from dataclasses import dataclass

PROTOCOL_VIOLATION = "08P01"
INVALID_PASSWORD = "28P01"

SCRAM_MECHANISM = "SCRAM-SHA-256"
# PostgreSQL's defaults: scram_iterations = 4096 (RFC 7677's minimum), SCRAM_DEFAULT_SALT_LEN 16,
# SCRAM_RAW_NONCE_LEN 18 (libpq and the backend both).
DEFAULT_ITERATIONS = 4096
SALT_LENGTH = 16
NONCE_LENGTH = 18
_KEY_LENGTH = 32  # SHA-256 digest size

_GS2_HEADERS = (b"n,,", b"y,,")


class AuthError(Exception):
    """Authentication failed or the exchange was garbled; `sqlstate` is what to tell the peer."""

    def __init__(self, message: str, sqlstate: str = PROTOCOL_VIOLATION) -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate


# ---------------------------------------------------------------------------------------------
# MD5 (PostgreSQL protocol 55.3 "AuthenticationMD5Password")


def _md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def is_md5_hash(s: str) -> bool:
    """True for PostgreSQL's stored MD5 form ("md5" + 32 hex digits), so it is not taken for a password."""
    return len(s) == 35 and s.startswith("md5") and all(c in "0123456789abcdef" for c in s[3:])


def md5_password(user: str, password: str, salt: bytes) -> str:
    """The PasswordMessage payload a client sends when a server asks for MD5 with `salt`."""
    inner = _md5_hex(password.encode() + user.encode())
    return "md5" + _md5_hex(inner.encode() + salt)


def md5_verify(user: str, stored: str, salt: bytes, response: str) -> bool:
    """Check a client's MD5 response against a plaintext password or a stored "md5<hex>" hash.

    A SCRAM verifier cannot answer an MD5 challenge (the hash it would need is not in it), so it
    never verifies; configuration refuses that pairing up front.
    """
    if is_scram_verifier(stored):
        return False
    inner = stored[3:] if is_md5_hash(stored) else _md5_hex(stored.encode() + user.encode())
    expected = "md5" + _md5_hex(inner.encode() + salt)
    return hmac.compare_digest(expected.encode(), response.encode("utf-8", "surrogateescape"))


# ---------------------------------------------------------------------------------------------
# SASLprep (RFC 4013) the way PostgreSQL applies it (src/common/saslprep.c)

_PROHIBITED = (
    stringprep.in_table_c12,
    stringprep.in_table_c21,
    stringprep.in_table_c22,
    stringprep.in_table_c3,
    stringprep.in_table_c4,
    stringprep.in_table_c5,
    stringprep.in_table_c6,
    stringprep.in_table_c7,
    stringprep.in_table_c8,
    stringprep.in_table_c9,
    stringprep.in_table_a1,  # unassigned code points: PostgreSQL prohibits them too
)


def saslprep(password: str) -> str:
    """Normalise a password so that every client hashes the same Unicode string the same way.

    Like `pg_saslprep`, a string SASLprep refuses is returned unchanged rather than rejected, so
    such passwords still work (RFC 5802 section 5.1 allows this for stored passwords).
    """
    if password.isascii():
        return password
    mapped = "".join(
        " " if stringprep.in_table_c12(c) else c for c in password if not stringprep.in_table_b1(c)
    )
    if not mapped:
        return password
    normalized = unicodedata.ucd_3_2_0.normalize("NFKC", mapped)
    if any(check(c) for c in normalized for check in _PROHIBITED):
        return password
    # RFC 3454 section 6: bidirectional strings must not mix, and must start and end right-to-left.
    if any(stringprep.in_table_d1(c) for c in normalized) and (
        any(stringprep.in_table_d2(c) for c in normalized)
        or not stringprep.in_table_d1(normalized[0])
        or not stringprep.in_table_d1(normalized[-1])
    ):
        return password
    return normalized


# ---------------------------------------------------------------------------------------------
# SCRAM-SHA-256


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.digest(key, msg, "sha256")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str | bytes, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise AuthError(f"malformed SCRAM message: invalid base64 in {what}") from None


@functools.lru_cache(maxsize=256)
def _derive_keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """(ClientKey, ServerKey) for a password; cached because PBKDF2 is deliberately slow.

    Backend logins repeat the same (password, salt, iterations) for every new server connection,
    and plaintext users repeat it for every client login: both pay the derivation once.
    """
    salted = hashlib.pbkdf2_hmac("sha256", saslprep(password).encode("utf-8"), salt, iterations)
    return _hmac(salted, b"Client Key"), _hmac(salted, b"Server Key")


def is_scram_verifier(s: str) -> bool:
    """True if `s` is a well-formed PostgreSQL SCRAM-SHA-256 verifier (as in pg_authid.rolpassword)."""
    try:
        ScramSecret.parse(s)
    except AuthError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class ScramSecret:
    """What a server must know to check a SCRAM login: never the password itself."""

    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    @classmethod
    def from_password(
        cls, password: str, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None
    ) -> ScramSecret:
        """Derive a secret from a plaintext password (a random salt unless one is given)."""
        if iterations < 1:
            raise AuthError("SCRAM iteration count must be at least 1")
        salt = secrets.token_bytes(SALT_LENGTH) if salt is None else salt
        client_key, server_key = _derive_keys(password, salt, iterations)
        return cls(iterations, salt, hashlib.sha256(client_key).digest(), server_key)

    @classmethod
    def parse(cls, verifier: str) -> ScramSecret:
        """Read PostgreSQL's stored form `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`."""
        try:
            mechanism, params, keys = verifier.split("$")
            iterations_text, salt_text = params.split(":")
            stored_text, server_text = keys.split(":")
        except ValueError:
            raise AuthError("not a SCRAM-SHA-256 verifier") from None
        if mechanism != SCRAM_MECHANISM or not iterations_text.isascii() or not iterations_text.isdigit():
            raise AuthError("not a SCRAM-SHA-256 verifier")
        iterations = int(iterations_text)
        salt = _unb64(salt_text, "verifier salt")
        stored_key = _unb64(stored_text, "verifier StoredKey")
        server_key = _unb64(server_text, "verifier ServerKey")
        if iterations < 1 or not salt or len(stored_key) != _KEY_LENGTH or len(server_key) != _KEY_LENGTH:
            raise AuthError("not a SCRAM-SHA-256 verifier")
        return cls(iterations, salt, stored_key, server_key)

    @classmethod
    def mock(cls, username: str, cluster_key: bytes) -> ScramSecret:
        """A secret for a user that does not exist, so a login attempt cannot tell that it does not.

        The salt is stable per username (like PostgreSQL's `scram_mock_salt`); the keys are random,
        so no proof ever matches.
        """
        salt = _hmac(cluster_key, username.encode("utf-8"))[:SALT_LENGTH]
        return cls(
            DEFAULT_ITERATIONS, salt, secrets.token_bytes(_KEY_LENGTH), secrets.token_bytes(_KEY_LENGTH)
        )

    def to_verifier(self) -> str:
        """PostgreSQL's stored form, as `ALTER ROLE ... PASSWORD '<verifier>'` accepts it."""
        return (
            f"{SCRAM_MECHANISM}${self.iterations}:{_b64(self.salt)}"
            f"${_b64(self.stored_key)}:{_b64(self.server_key)}"
        )


@functools.lru_cache(maxsize=1024)
def server_secret(user: str, stored: str) -> ScramSecret:
    """The secret for a configured user, whose password is a SCRAM verifier or plaintext.

    Cached per (user, password): PBKDF2 runs once per configured user, not once per login. The
    random salt is chosen then and kept, so a client sees the same salt on every login, as with
    a stored verifier.
    """
    if stored.startswith(SCRAM_MECHANISM + "$"):
        return ScramSecret.parse(stored)
    return ScramSecret.from_password(stored)


def _new_nonce() -> str:
    return _b64(secrets.token_bytes(NONCE_LENGTH))


def _valid_nonce(nonce: str) -> bool:
    """RFC 5802 section 7: printable ASCII except ','."""
    return bool(nonce) and all("\x21" <= c <= "\x7e" and c != "," for c in nonce)


def _attributes(message: str, what: str) -> list[tuple[str, str]]:
    """Split a SCRAM message into its (letter, value) attributes, in order."""
    out = []
    for part in message.split(","):
        if len(part) < 2 or part[1] != "=" or not ("a" <= part[0] <= "z" or "A" <= part[0] <= "Z"):
            raise AuthError(f"malformed SCRAM message: bad attribute in {what}")
        out.append((part[0], part[2:]))
    return out


def _decode(data: bytes, what: str) -> str:
    try:
        return bytes(data).decode("utf-8")
    except (UnicodeDecodeError, TypeError):
        raise AuthError(f"malformed SCRAM message: {what} is not UTF-8") from None


class ScramServer:
    """The server half of one SCRAM-SHA-256 exchange, for a client logging in to pgshard."""

    def __init__(self, secret: ScramSecret, nonce: str | None = None) -> None:
        """`nonce` is this server's half of the nonce; injectable so tests can replay RFC vectors."""
        self.secret = secret
        self._server_nonce = nonce if nonce is not None else _new_nonce()
        self._gs2_header = b""
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""
        self._done = False

    def server_first(self, client_first: bytes) -> bytes:
        """Answer the client's SASLInitialResponse data with the salt, iterations and joint nonce."""
        if self._server_first:
            raise AuthError("malformed SCRAM message: unexpected client-first-message")
        text = _decode(client_first, "client-first-message")
        gs2 = text[:3].encode()
        if text.startswith("p="):
            raise AuthError("channel binding was requested but pgshard does not offer SCRAM-SHA-256-PLUS")
        if text.startswith(("n,a=", "y,a=")):
            raise AuthError("client uses authorization identity, but it is not supported", "0A000")
        if gs2 not in _GS2_HEADERS:
            raise AuthError("malformed SCRAM message: bad GS2 header")
        bare = text[3:]
        attrs = _attributes(bare, "client-first-message")
        if attrs[0][0] == "m":
            raise AuthError("client requires an unsupported SCRAM extension", "0A000")
        if len(attrs) < 2 or attrs[0][0] != "n" or attrs[1][0] != "r" or not _valid_nonce(attrs[1][1]):
            raise AuthError("malformed SCRAM message: client-first-message needs n= and r=")
        # attrs[0] (the username) is ignored: PostgreSQL authenticates the start-up packet's user.
        self._gs2_header = gs2
        self._client_first_bare = bare
        self._nonce = attrs[1][1] + self._server_nonce
        self._server_first = f"r={self._nonce},s={_b64(self.secret.salt)},i={self.secret.iterations}"
        return self._server_first.encode("ascii")

    def server_final(self, client_final: bytes) -> bytes:
        """Check the client's proof; return the server-final-message proving we knew the secret too."""
        if not self._server_first or self._done:
            raise AuthError("malformed SCRAM message: unexpected client-final-message")
        self._done = True
        text = _decode(client_final, "client-final-message")
        without_proof, sep, proof_text = text.rpartition(",p=")
        if not sep:
            raise AuthError("malformed SCRAM message: client-final-message has no proof")
        attrs = _attributes(without_proof, "client-final-message")
        if len(attrs) < 2 or attrs[0][0] != "c" or attrs[1][0] != "r":
            raise AuthError("malformed SCRAM message: client-final-message needs c= and r=")
        if _unb64(attrs[0][1], "channel binding") != self._gs2_header:
            raise AuthError("SCRAM channel binding check failed")
        if not hmac.compare_digest(attrs[1][1].encode(), self._nonce.encode()):
            raise AuthError("SCRAM nonce mismatch")
        proof = _unb64(proof_text, "client proof")
        if len(proof) != _KEY_LENGTH:
            raise AuthError("malformed SCRAM message: client proof has the wrong length")
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        signature = _hmac(self.secret.stored_key, auth_message)
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), self.secret.stored_key):
            raise AuthError("password authentication failed", INVALID_PASSWORD)
        return b"v=" + _b64(_hmac(self.secret.server_key, auth_message)).encode("ascii")


class ScramClient:
    """The client half of one SCRAM-SHA-256 exchange, for pgshard logging in to a backend."""

    def __init__(self, password: str, nonce: str | None = None, username: str = "") -> None:
        """`nonce` and `username` are injectable for RFC test vectors; PostgreSQL ignores the name."""
        self.password = password
        self._nonce = nonce if nonce is not None else _new_nonce()
        if not _valid_nonce(self._nonce):
            raise AuthError("SCRAM client nonce must be printable ASCII without ','")
        name = username.replace("=", "=3D").replace(",", "=2C")
        self._client_first_bare = f"n={name},r={self._nonce}"
        self._server_signature = b""

    def client_first(self) -> bytes:
        """The SASLInitialResponse data: no channel binding, nonce, (empty) username."""
        return b"n,," + self._client_first_bare.encode("utf-8")

    def client_final(self, server_first: bytes) -> bytes:
        """Prove we know the password, given the server's salt, iterations and joint nonce."""
        text = _decode(server_first, "server-first-message")
        attrs = _attributes(text, "server-first-message")
        if attrs[0][0] == "m":
            raise AuthError("server requires an unsupported SCRAM extension")
        fields = dict(attrs)
        nonce, salt_text, iterations_text = fields.get("r", ""), fields.get("s", ""), fields.get("i", "")
        if not nonce.startswith(self._nonce) or len(nonce) == len(self._nonce) or not _valid_nonce(nonce):
            raise AuthError("invalid SCRAM response: server nonce does not extend the client's")
        salt = _unb64(salt_text, "salt")
        if not salt or not iterations_text.isascii() or not iterations_text.isdigit():
            raise AuthError("malformed SCRAM message: bad salt or iteration count")
        iterations = int(iterations_text)
        if iterations < 1:
            raise AuthError("malformed SCRAM message: bad iteration count")
        client_key, server_key = _derive_keys(self.password, salt, iterations)
        without_proof = f"c={_b64(b'n,,')},r={nonce}"
        auth_message = f"{self._client_first_bare},{text},{without_proof}".encode()
        signature = _hmac(hashlib.sha256(client_key).digest(), auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        self._server_signature = _hmac(server_key, auth_message)
        return f"{without_proof},p={_b64(proof)}".encode("ascii")

    def verify_server_final(self, server_final: bytes) -> None:
        """Make sure the server knew our secret too (mutual authentication), or say why not."""
        if not self._server_signature:
            raise AuthError("malformed SCRAM message: unexpected server-final-message")
        text = _decode(server_final, "server-final-message")
        if text.startswith("e="):
            raise AuthError(f"SCRAM authentication failed: server error {text[2:].split(',')[0]!r}")
        if not text.startswith("v="):
            raise AuthError("malformed SCRAM message: server-final-message needs v=")
        signature = _unb64(text[2:].split(",")[0], "server signature")
        if not hmac.compare_digest(signature, self._server_signature):
            raise AuthError("invalid SCRAM server signature: the server does not know the password")
