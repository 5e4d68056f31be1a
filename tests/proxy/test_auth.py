"""MD5 and SCRAM-SHA-256 against RFC vectors, real PostgreSQL verifiers, and garbage."""

from __future__ import annotations

import base64
import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.protocol.auth import (
    INVALID_PASSWORD,
    AuthError,
    ScramClient,
    ScramSecret,
    ScramServer,
    is_md5_hash,
    is_scram_verifier,
    md5_password,
    md5_verify,
    saslprep,
    server_secret,
)

# RFC 7677 section 3: user "user", password "pencil".
RFC_CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="

# From PostgreSQL 15: CREATE ROLE ... PASSWORD '...'; SELECT rolname, rolpassword FROM pg_authid.
PG_ALICE = (  # password "pencil", password_encryption = scram-sha-256
    "SCRAM-SHA-256$4096:hWk6geT9V8VF8hcWwFdnmg==$k349uvH2wfzNQV1qe/OnaA2bftf1GLA0B5IdI6iqw7I="
    ":HJwuy/jL+EAO3IVQMUy2WhF5KR+hSEQ9bgd5NLPlRTc="
)
PG_BOB = (  # password "\u2168 p\u00e4ssw\u00f6rd": SASLprep maps the Roman numeral nine to "IX"
    "SCRAM-SHA-256$4096:G2M/iCPBmBjeh6gPylPdqw==$2t3FS4UYf8jPynr4o15oh6esG8/wECibCOf7zHDa3Ok="
    ":F6vaSaxvWdEDFTF+KkbSVXW/ntNajGHXJWz4KUOLmFI="
)
PG_CAROL_MD5 = "md5bd9b2f028f0da30651d603cf780feee9"  # password "pencil", password_encryption = md5


def login(password: str, secret: ScramSecret) -> None:
    """Run a whole exchange; raises AuthError where it would fail."""
    client, server = ScramClient(password), ScramServer(secret)
    server_first = server.server_first(client.client_first())
    server_final = server.server_final(client.client_final(server_first))
    client.verify_server_final(server_final)


def test_md5_password_matches_postgresql_stored_hash() -> None:
    salt = b"\x01\x02\x03\x04"
    response = md5_password("carol", "pencil", salt)
    assert response.startswith("md5") and len(response) == 35
    assert md5_verify("carol", PG_CAROL_MD5, salt, response)
    assert md5_verify("carol", "pencil", salt, response)
    assert not md5_verify("carol", "pencil", b"\x00\x00\x00\x00", response)
    assert not md5_verify("carol", "pen", salt, response)
    assert not md5_verify("carol", PG_ALICE, salt, response)
    assert not md5_verify("carol", "pencil", salt, "md5\u00e9garbage")


def test_md5_hash_and_verifier_recognition() -> None:
    assert is_md5_hash(PG_CAROL_MD5)
    assert not is_md5_hash("md5-not-a-hash")
    assert is_scram_verifier(PG_ALICE)
    assert not is_scram_verifier("pencil")
    assert not is_scram_verifier("SCRAM-SHA-256$0:AAAA$" + "A" * 44 + ":" + "A" * 44)
    assert not is_scram_verifier("SCRAM-SHA-256$4096:!!$x:y")


def test_rfc7677_vector_client_side() -> None:
    client = ScramClient("pencil", nonce=RFC_CLIENT_NONCE, username="user")
    assert client.client_first() == RFC_CLIENT_FIRST
    assert client.client_final(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    client.verify_server_final(RFC_SERVER_FINAL)


def test_rfc7677_vector_server_side() -> None:
    server = ScramServer(ScramSecret.from_password("pencil", salt=RFC_SALT), nonce=RFC_SERVER_NONCE)
    assert server.server_first(RFC_CLIENT_FIRST) == RFC_SERVER_FIRST
    assert server.server_final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL


def test_round_trip_and_wrong_password() -> None:
    secret = ScramSecret.from_password("s3cret")
    login("s3cret", secret)
    with pytest.raises(AuthError) as err:
        login("wrong", secret)
    assert err.value.sqlstate == INVALID_PASSWORD


def test_postgresql_verifiers_parse_and_verify() -> None:
    alice = ScramSecret.parse(PG_ALICE)
    assert alice.iterations == 4096
    assert alice.to_verifier() == PG_ALICE
    assert ScramSecret.from_password("pencil", salt=alice.salt).to_verifier() == PG_ALICE
    login("pencil", alice)
    with pytest.raises(AuthError):
        login("Pencil", alice)
    login("\u2168 p\u00e4ssw\u00f6rd", ScramSecret.parse(PG_BOB))
    login("IX p\u00e4ssw\u00f6rd", ScramSecret.parse(PG_BOB))


def test_saslprep() -> None:
    assert saslprep("plain ascii\x07") == "plain ascii\x07"
    assert saslprep("I\u00adX") == "IX"  # soft hyphen maps to nothing
    assert saslprep("a\u00a0b\u00e9") == "a b\u00e9"  # non-ASCII space maps to space
    assert saslprep("\u00e9\x07") == "\u00e9\x07"  # prohibited: used as it is, like PostgreSQL
    assert saslprep("\u00ad") == "\u00ad"  # empty after mapping: used as it is


def test_server_secret_is_cached_per_user_and_accepts_verifiers() -> None:
    assert server_secret("app", "pw") is server_secret("app", "pw")
    assert server_secret("app", "pw").salt != server_secret("other", "pw").salt
    assert server_secret("alice", PG_ALICE) == ScramSecret.parse(PG_ALICE)
    login("pw", server_secret("app", "pw"))


def test_gs2_y_flag_accepted_p_flag_and_authzid_refused() -> None:
    secret = ScramSecret.from_password("pencil", salt=RFC_SALT)
    server = ScramServer(secret, nonce="srv")
    first = server.server_first(b"y,,n=,r=abc").decode()
    assert first.startswith("r=abcsrv,")
    client = ScramClient("pencil", nonce="abc")
    final = client.client_final(first.encode()).replace(b"c=biws", b"c=eSws")
    with pytest.raises(AuthError):  # proof was computed over c=biws, so it no longer matches
        server.server_final(final)
    for bad in (b"p=tls-server-end-point,,n=,r=abc", b"n,a=bob,n=,r=abc", b"n,,m=ext,n=,r=abc"):
        with pytest.raises(AuthError):
            ScramServer(secret).server_first(bad)


def test_client_rejects_bad_server_messages() -> None:
    client = ScramClient("pencil", nonce="abc")
    with pytest.raises(AuthError):
        client.verify_server_final(b"v=AAAA")  # before client_final
    with pytest.raises(AuthError):
        client.client_final(b"r=xyz,s=AAAA,i=4096")  # nonce does not extend ours
    with pytest.raises(AuthError):
        client.client_final(b"r=abc,s=AAAA,i=4096")  # server added nothing
    client.client_final(b"r=abcdef,s=" + base64.b64encode(RFC_SALT) + b",i=4096")
    with pytest.raises(AuthError, match="invalid-proof"):
        client.verify_server_final(b"e=invalid-proof")
    with pytest.raises(AuthError):
        client.verify_server_final(RFC_SERVER_FINAL)


def test_server_refuses_out_of_order_and_replayed_messages() -> None:
    secret = ScramSecret.from_password("pencil", salt=RFC_SALT)
    with pytest.raises(AuthError):
        ScramServer(secret).server_final(RFC_CLIENT_FINAL)
    server = ScramServer(secret, nonce=RFC_SERVER_NONCE)
    server.server_first(RFC_CLIENT_FIRST)
    with pytest.raises(AuthError):
        server.server_first(RFC_CLIENT_FIRST)
    server.server_final(RFC_CLIENT_FINAL)
    with pytest.raises(AuthError):
        server.server_final(RFC_CLIENT_FINAL)
    other = ScramServer(secret)  # fresh nonce: a recorded exchange cannot be replayed
    other.server_first(RFC_CLIENT_FIRST)
    with pytest.raises(AuthError):
        other.server_final(RFC_CLIENT_FINAL)


def test_mock_secret_is_stable_in_salt_and_never_verifies() -> None:
    a, b = ScramSecret.mock("ghost", b"k"), ScramSecret.mock("ghost", b"k")
    assert a.salt == b.salt and a.stored_key != b.stored_key
    with pytest.raises(AuthError):
        login("anything", a)


_SECRET = ScramSecret.from_password("pencil", salt=RFC_SALT)
_scramish = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=100).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.lists(
        st.sampled_from(
            ["n,,", "y,,", "p=x,,", "n=", "r=", "c=biws", "p=", "s=", "i=", ",", "=", "AAAA", "abc"]
        ),
        max_size=12,
    ).map(lambda parts: "".join(parts).encode()),
)


@settings(max_examples=400)
@given(first=_scramish, final=_scramish)
def test_server_raises_only_auth_error_on_garbage(first: bytes, final: bytes) -> None:
    server = ScramServer(_SECRET)
    with contextlib.suppress(AuthError):
        server.server_first(first)
    with contextlib.suppress(AuthError):
        server.server_final(final)


@settings(max_examples=300)
@given(final=_scramish)
def test_server_final_garbage_after_valid_first(final: bytes) -> None:
    server = ScramServer(_SECRET)
    server.server_first(b"n,,n=,r=abc")
    with pytest.raises(AuthError):
        server.server_final(final)


@settings(max_examples=300)
@given(first=_scramish, final=_scramish)
def test_client_raises_only_auth_error_on_garbage(first: bytes, final: bytes) -> None:
    client = ScramClient("pencil", nonce="abc")
    with contextlib.suppress(AuthError):
        client.client_final(first)
    with contextlib.suppress(AuthError):
        client.verify_server_final(final)
