"""Property tests of the sans-IO codec.

1. Every message type survives encode -> frame (framing.iter_messages) -> decode unchanged.
2. No input, however garbled, makes a decoder (or the framing) raise anything but ProtocolError:
   arbitrary bytes, and valid messages truncated, extended or with a byte changed.
Example counts are kept small so the file runs in a few seconds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.protocol import backend as be
from proxy.protocol import frontend as fe
from proxy.protocol.errors import ProtocolError
from proxy.protocol.framing import iter_messages, startup_packet_length

FEW = settings(max_examples=30, deadline=None)

# Protocol strings are UTF-8 without NUL (55.6 "String"); surrogates cannot be encoded at all.
text = st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), max_size=20)
blob = st.binary(max_size=40)
values = st.lists(st.none() | blob, max_size=6)
int16 = st.integers(-(2**15), 2**15 - 1)
int32 = st.integers(-(2**31), 2**31 - 1)
uint32 = st.integers(0, 2**32 - 1)
kind = st.sampled_from([b"S", b"P"])


def one_message(encoded: bytes) -> tuple[int, bytes]:
    """Frame an encoded message back into its type and body, as the session would."""
    [(msg_type, start, end)] = list(iter_messages(encoded))
    assert end == len(encoded)
    return msg_type, encoded[start + 5 : end]


@st.composite
def formats_for(draw: st.DrawFn, n: int) -> list[int]:
    """Format codes obeying 55.7 Bind: none, one for all, or one per value."""
    how = draw(st.sampled_from(["none", "one", "each"]))
    count = {"none": 0, "one": 1, "each": n}[how]
    return draw(st.lists(int16, min_size=count, max_size=count))


@st.composite
def bind_args(draw: st.DrawFn) -> tuple[str, str, list[int], list[bytes | None], list[int]]:
    params = draw(values)
    return draw(text), draw(text), draw(formats_for(len(params))), params, draw(st.lists(int16, max_size=4))


@st.composite
def function_call_args(draw: st.DrawFn) -> tuple[int, list[int], list[bytes | None], int]:
    args = draw(values)
    return draw(uint32), draw(formats_for(len(args))), args, draw(int16)


# (encoder arguments strategy, encoder, the message decode_frontend must give back)
FRONTEND_CASES: dict[str, tuple[st.SearchStrategy[Any], Callable[..., bytes], Callable[..., Any]]] = {
    "Query": (st.tuples(text), fe.query, fe.Query),
    "Parse": (
        st.tuples(text, text, st.lists(uint32, max_size=5)),
        fe.parse,
        lambda n, q, o: fe.Parse(n, q, tuple(o)),
    ),
    "Bind": (
        bind_args(),
        fe.bind,
        lambda p, s, f, v, r: fe.Bind(p, s, tuple(f), tuple(v), tuple(r)),
    ),
    "Describe": (st.tuples(kind, text), fe.describe, fe.Describe),
    "Execute": (st.tuples(text, int32), fe.execute, fe.Execute),
    "Close": (st.tuples(kind, text), fe.close, fe.Close),
    "Sync": (st.tuples(), fe.sync, fe.Sync),
    "Flush": (st.tuples(), fe.flush, fe.Flush),
    "Terminate": (st.tuples(), fe.terminate, fe.Terminate),
    "CopyData": (st.tuples(blob), fe.copy_data, fe.CopyData),
    "CopyDone": (st.tuples(), fe.copy_done, fe.CopyDone),
    "CopyFail": (st.tuples(text), fe.copy_fail, fe.CopyFail),
    "FunctionCall": (
        function_call_args(),
        fe.function_call,
        lambda o, f, a, r: fe.FunctionCall(o, tuple(f), tuple(a), r),
    ),
    "PasswordMessage": (
        st.tuples(text),
        fe.password,
        lambda pw: fe.AuthenticationResponse(pw.encode() + b"\x00"),
    ),
    "SASLResponse": (st.tuples(blob), fe.sasl_response, fe.AuthenticationResponse),
}


@pytest.mark.parametrize("name", FRONTEND_CASES)
@FEW
@given(data=st.data())
def test_frontend_round_trip(name: str, data: st.DataObject) -> None:
    args_strategy, encode, expected = FRONTEND_CASES[name]
    args = data.draw(args_strategy)
    assert fe.decode_frontend(*one_message(encode(*args))) == expected(*args)


@FEW
@given(text, text, st.none() | blob)
def test_authentication_response_round_trip(pw: str, mechanism: str, data: bytes | None) -> None:
    assert fe.decode_password(one_message(fe.password(pw))[1]) == pw
    _, body = one_message(fe.sasl_initial_response(mechanism, data))
    assert fe.decode_sasl_initial_response(body) == fe.SASLInitialResponse(mechanism, data)


names = text.filter(bool)


@FEW
@given(st.dictionaries(names, text, max_size=5), names, st.integers(0, 0xFFFF))
def test_startup_round_trip(params: dict[str, str], user: str, minor: int) -> None:
    params = {**params, "user": user}
    packet = fe.startup(params, protocol=3 << 16 | minor)
    assert startup_packet_length(packet, max_length=1 << 20) == len(packet)
    assert fe.decode_startup(packet) == fe.StartupMessage(3 << 16 | minor, params)


@FEW
@given(uint32, uint32)
def test_cancel_request_round_trip(pid: int, secret: int) -> None:
    assert fe.decode_startup(fe.cancel_request(pid, secret)) == fe.CancelRequest(pid, secret)


field_description = st.builds(be.FieldDescription, text, uint32, int16, uint32, int16, int32, int16)
error_fields = st.dictionaries(st.characters(min_codepoint=1, max_codepoint=127), text, max_size=6)

BACKEND_CASES: dict[str, tuple[st.SearchStrategy[Any], Callable[..., bytes], Callable[..., Any]]] = {
    "AuthenticationOk": (st.tuples(), be.authentication_ok, be.AuthenticationOk),
    "AuthenticationKerberosV5": (st.tuples(), be.authentication_kerberos_v5, be.AuthenticationKerberosV5),
    "AuthenticationCleartextPassword": (
        st.tuples(),
        be.authentication_cleartext,
        be.AuthenticationCleartextPassword,
    ),
    "AuthenticationMD5Password": (
        st.tuples(st.binary(min_size=4, max_size=4)),
        be.authentication_md5,
        be.AuthenticationMD5Password,
    ),
    "AuthenticationGSS": (st.tuples(), be.authentication_gss, be.AuthenticationGSS),
    "AuthenticationGSSContinue": (
        st.tuples(blob),
        be.authentication_gss_continue,
        be.AuthenticationGSSContinue,
    ),
    "AuthenticationSSPI": (st.tuples(), be.authentication_sspi, be.AuthenticationSSPI),
    "AuthenticationSASL": (
        st.tuples(st.lists(names, max_size=3)),
        be.authentication_sasl,
        lambda m: be.AuthenticationSASL(tuple(m)),
    ),
    "AuthenticationSASLContinue": (
        st.tuples(blob),
        be.authentication_sasl_continue,
        be.AuthenticationSASLContinue,
    ),
    "AuthenticationSASLFinal": (st.tuples(blob), be.authentication_sasl_final, be.AuthenticationSASLFinal),
    "BackendKeyData": (st.tuples(uint32, uint32), be.backend_key_data, be.BackendKeyData),
    "BindComplete": (st.tuples(), be.bind_complete, be.BindComplete),
    "CloseComplete": (st.tuples(), be.close_complete, be.CloseComplete),
    "CommandComplete": (st.tuples(text), be.command_complete, be.CommandComplete),
    "CopyData": (st.tuples(blob), be.copy_data, be.CopyData),
    "CopyDone": (st.tuples(), be.copy_done, be.CopyDone),
    "CopyInResponse": (
        st.tuples(st.integers(0, 255), st.lists(int16, max_size=5)),
        be.copy_in_response,
        lambda f, c: be.CopyInResponse(f, tuple(c)),
    ),
    "CopyOutResponse": (
        st.tuples(st.integers(0, 255), st.lists(int16, max_size=5)),
        be.copy_out_response,
        lambda f, c: be.CopyOutResponse(f, tuple(c)),
    ),
    "CopyBothResponse": (
        st.tuples(st.integers(0, 255), st.lists(int16, max_size=5)),
        be.copy_both_response,
        lambda f, c: be.CopyBothResponse(f, tuple(c)),
    ),
    "DataRow": (st.tuples(values), be.data_row, lambda v: be.DataRow(tuple(v))),
    "EmptyQueryResponse": (st.tuples(), be.empty_query_response, be.EmptyQueryResponse),
    "ErrorResponse": (st.tuples(error_fields), be.error_response_from_fields, be.ErrorResponse),
    "NoticeResponse": (st.tuples(error_fields), be.notice_response_from_fields, be.NoticeResponse),
    "FunctionCallResponse": (st.tuples(st.none() | blob), be.function_call_response, be.FunctionCallResponse),
    "NegotiateProtocolVersion": (
        st.tuples(int32, st.lists(text, max_size=3)),
        be.negotiate_protocol_version,
        lambda m, o: be.NegotiateProtocolVersion(m, tuple(o)),
    ),
    "NoData": (st.tuples(), be.no_data, be.NoData),
    "NotificationResponse": (
        st.tuples(uint32, text, text),
        be.notification_response,
        be.NotificationResponse,
    ),
    "ParameterDescription": (
        st.tuples(st.lists(uint32, max_size=5)),
        be.parameter_description,
        lambda o: be.ParameterDescription(tuple(o)),
    ),
    "ParameterStatus": (st.tuples(text, text), be.parameter_status, be.ParameterStatus),
    "ParseComplete": (st.tuples(), be.parse_complete, be.ParseComplete),
    "PortalSuspended": (st.tuples(), be.portal_suspended, be.PortalSuspended),
    "ReadyForQuery": (st.tuples(st.sampled_from([b"I", b"T", b"E"])), be.ready_for_query, be.ReadyForQuery),
    "RowDescription": (
        st.tuples(st.lists(field_description, max_size=4)),
        be.row_description,
        lambda f: be.RowDescription(tuple(f)),
    ),
}


@pytest.mark.parametrize("name", BACKEND_CASES)
@FEW
@given(data=st.data())
def test_backend_round_trip(name: str, data: st.DataObject) -> None:
    args_strategy, encode, expected = BACKEND_CASES[name]
    args = data.draw(args_strategy)
    assert be.decode_backend(*one_message(encode(*args))) == expected(*args)


@FEW
@given(text, text, text, st.sampled_from(["ERROR", "FATAL", "PANIC"]), text, st.integers(1, 10**6))
def test_error_response_round_trip(
    sqlstate: str, message: str, hint: str, severity: str, detail: str, pos: int
) -> None:
    _, body = one_message(
        be.error_response(sqlstate, message, severity, detail=detail, hint=hint, position=pos)
    )
    expected = {
        "S": severity,
        "V": severity,
        "C": sqlstate,
        "M": message,
        "D": detail,
        "H": hint,
        "P": str(pos),
    }
    assert be.decode_error_fields(body) == expected


# --- Garbage in, ProtocolError out ---------------------------------------------------------------

BODY_DECODERS: dict[str, Callable[[bytes], object]] = {
    name: getattr(module, name)
    for module in (fe, be)
    for name in dir(module)
    if name.startswith("decode_") and name not in {"decode_frontend", "decode_backend", "decode_startup"}
}

# Valid bodies to mutate, so garbage also reaches the deep paths that random bytes rarely do.
SAMPLE_BODIES = [
    one_message(m)[1]
    for m in (
        fe.parse("s", "select $1", [23]),
        fe.bind("", "s", [1], [b"abcd", None], [0, 1]),
        fe.function_call(1, [0], [b"x"], 0),
        fe.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=x"),
        be.row_description([be.FieldDescription("a"), be.FieldDescription("b")]),
        be.data_row([b"1", None]),
        be.error_response("XX000", "m", detail="d"),
        be.authentication_sasl(["SCRAM-SHA-256"]),
        be.negotiate_protocol_version(0, ["_pq_.a"]),
        be.notification_response(1, "c", "p"),
        be.copy_in_response(0, [0, 1]),
    )
]


@st.composite
def garbled(draw: st.DrawFn) -> bytes:
    """Arbitrary bytes, or a valid body cut short, extended, or with one byte changed."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=64))
    body = bytearray(draw(st.sampled_from(SAMPLE_BODIES)))
    how = draw(st.sampled_from(["cut", "extend", "change"]))
    if how == "cut":
        return bytes(body[: draw(st.integers(0, max(len(body) - 1, 0)))])
    if how == "extend":
        return bytes(body) + draw(st.binary(min_size=1, max_size=8))
    body[draw(st.integers(0, len(body) - 1))] = draw(st.integers(0, 255))
    return bytes(body)


def only_protocol_errors(call: Callable[[], object]) -> None:
    with contextlib.suppress(ProtocolError):
        call()


@pytest.mark.parametrize("name", sorted(BODY_DECODERS))
@settings(max_examples=40, deadline=None)
@given(body=garbled())
def test_body_decoders_only_raise_protocol_error(name: str, body: bytes) -> None:
    only_protocol_errors(lambda: BODY_DECODERS[name](body))


@settings(max_examples=150, deadline=None)
@given(msg_type=st.integers(0, 255), body=garbled())
def test_generic_decoders_only_raise_protocol_error(msg_type: int, body: bytes) -> None:
    only_protocol_errors(lambda: fe.decode_frontend(msg_type, body))
    only_protocol_errors(lambda: be.decode_backend(msg_type, body))


@settings(max_examples=150, deadline=None)
@given(payload=st.binary(max_size=48), honest_length=st.booleans())
def test_decode_startup_only_raises_protocol_error(payload: bytes, honest_length: bool) -> None:
    # With an honest length word the garbage reaches the version code and parameter parsing.
    packet = (len(payload) + 4).to_bytes(4, "big") + payload if honest_length else payload
    only_protocol_errors(lambda: fe.decode_startup(packet))
    only_protocol_errors(lambda: startup_packet_length(packet))


@settings(max_examples=100, deadline=None)
@given(options=st.text(alphabet=" \\-c=ab\t", max_size=24))
def test_startup_options_only_raise_protocol_error(options: str) -> None:
    args = fe.split_options(options)
    assert all(" " not in a or "\\" in options for a in args)
    only_protocol_errors(lambda: fe.options_settings(options))


@settings(max_examples=150, deadline=None)
@given(buf=st.binary(max_size=96), max_length=st.integers(0, 64))
def test_framing_only_raises_protocol_error(buf: bytes, max_length: int) -> None:
    only_protocol_errors(lambda: list(iter_messages(buf, max_length=max_length)))
    only_protocol_errors(lambda: list(iter_messages(buf)))


def test_every_body_decoder_is_fuzzed() -> None:
    # A new decode_* function joins the fuzzing automatically; this guards the discovery itself.
    assert {
        "decode_bind",
        "decode_parse",
        "decode_data_row",
        "decode_row_description",
    } <= BODY_DECODERS.keys()
    assert len(BODY_DECODERS) >= 24
