"""The Authentication ('R') messages: how a server asks a client to prove who it is, and says it has.

PostgreSQL protocol section 55.7 "Message Formats" (AuthenticationOk ... AuthenticationSASLFinal);
the exchanges themselves are 55.2.1 "Start-up" and 55.3 "SASL Authentication". pgshard sends these
to its clients and reads them from its shards; the password arithmetic (MD5, SCRAM-SHA-256) is
auth.py's job, not this module's. Import through `proxy.protocol.backend`, which offers every name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from proxy.protocol._reader import Body, BodyReader
from proxy.protocol._writer import INT32, cstr, frame
from proxy.protocol.backend_messages import (
    Authentication,
    AuthenticationCleartextPassword,
    AuthenticationGSS,
    AuthenticationGSSContinue,
    AuthenticationKerberosV5,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    AuthenticationSSPI,
)
from proxy.protocol.errors import ProtocolError

# 55.7 Authentication*: the Int32 after the length says which request it is.
AUTH_OK_CODE, AUTH_KERBEROS_V5, AUTH_CLEARTEXT, AUTH_MD5, AUTH_GSS = 0, 2, 3, 5, 7
AUTH_GSS_CONTINUE, AUTH_SSPI, AUTH_SASL, AUTH_SASL_CONTINUE, AUTH_SASL_FINAL = 8, 9, 10, 11, 12


def _auth(code: int, data: bytes = b"") -> bytes:
    return frame(b"R", INT32.pack(code) + data)


AUTH_OK = _auth(AUTH_OK_CODE)


def authentication_ok() -> bytes:
    return AUTH_OK


def authentication_kerberos_v5() -> bytes:
    return _auth(AUTH_KERBEROS_V5)


def authentication_cleartext() -> bytes:
    return _auth(AUTH_CLEARTEXT)


def authentication_md5(salt: bytes) -> bytes:
    if len(salt) != 4:
        raise ValueError("an MD5 salt is 4 bytes")
    return _auth(AUTH_MD5, salt)


def authentication_gss() -> bytes:
    return _auth(AUTH_GSS)


def authentication_gss_continue(data: bytes) -> bytes:
    return _auth(AUTH_GSS_CONTINUE, data)


def authentication_sspi() -> bytes:
    return _auth(AUTH_SSPI)


def authentication_sasl(mechanisms: Sequence[str]) -> bytes:
    """55.3 SASL Authentication: the mechanisms on offer, a String each, then a terminating NUL."""
    return _auth(AUTH_SASL, b"".join(cstr(m) for m in mechanisms) + b"\x00")


def authentication_sasl_continue(data: bytes) -> bytes:
    return _auth(AUTH_SASL_CONTINUE, data)


def authentication_sasl_final(data: bytes) -> bytes:
    return _auth(AUTH_SASL_FINAL, data)


_AUTH_EMPTY: dict[int, Authentication] = {
    AUTH_OK_CODE: AuthenticationOk(),
    AUTH_KERBEROS_V5: AuthenticationKerberosV5(),
    AUTH_CLEARTEXT: AuthenticationCleartextPassword(),
    AUTH_GSS: AuthenticationGSS(),
    AUTH_SSPI: AuthenticationSSPI(),
}
_AUTH_DATA: dict[int, Callable[[bytes], Authentication]] = {
    AUTH_GSS_CONTINUE: AuthenticationGSSContinue,
    AUTH_SASL_CONTINUE: AuthenticationSASLContinue,
    AUTH_SASL_FINAL: AuthenticationSASLFinal,
}


def decode_authentication(body: Body) -> Authentication:
    """Which authentication the server asks for, or that it is done (AuthenticationOk)."""
    r = BodyReader(body, "Authentication")
    code = r.int32()
    if code in _AUTH_EMPTY:
        r.finish()
        return _AUTH_EMPTY[code]
    if code in _AUTH_DATA:
        return _AUTH_DATA[code](r.rest())
    if code == AUTH_MD5:
        message: Authentication = AuthenticationMD5Password(r.take(4))
    elif code == AUTH_SASL:
        mechanisms = []
        while mechanism := r.cstring():
            mechanisms.append(mechanism)
        message = AuthenticationSASL(tuple(mechanisms))
    else:
        raise ProtocolError(f"authentication request type {code} is not supported")
    r.finish()
    return message


__all__ = [
    "AUTH_CLEARTEXT",
    "AUTH_GSS",
    "AUTH_GSS_CONTINUE",
    "AUTH_KERBEROS_V5",
    "AUTH_MD5",
    "AUTH_OK",
    "AUTH_OK_CODE",
    "AUTH_SASL",
    "AUTH_SASL_CONTINUE",
    "AUTH_SASL_FINAL",
    "AUTH_SSPI",
    "authentication_cleartext",
    "authentication_gss",
    "authentication_gss_continue",
    "authentication_kerberos_v5",
    "authentication_md5",
    "authentication_ok",
    "authentication_sasl",
    "authentication_sasl_continue",
    "authentication_sasl_final",
    "authentication_sspi",
    "decode_authentication",
]
