"""Unit tests of the sans-IO codec: byte vectors from the protocol's "Message Formats" section (55.7),
and each way a malformed message must be refused with a ProtocolError."""

from __future__ import annotations

import pytest

from proxy.protocol import backend as be
from proxy.protocol import frontend as fe
from proxy.protocol.errors import ProtocolError
from proxy.protocol.framing import iter_messages


def body_of(message: bytes) -> tuple[int, bytes]:
    """Frame one encoded message back into (type, body), checking it is exactly one message."""
    [(msg_type, start, end)] = list(iter_messages(message))
    assert end == len(message)
    return msg_type, message[start + 5 : end]


# --- Frontend: known vectors ---------------------------------------------------------------------


def test_constant_frontend_messages() -> None:
    assert fe.sync() == fe.SYNC == b"S\x00\x00\x00\x04"
    assert fe.flush() == fe.FLUSH == b"H\x00\x00\x00\x04"
    assert fe.terminate() == fe.TERMINATE == b"X\x00\x00\x00\x04"
    assert fe.copy_done() == fe.COPY_DONE == b"c\x00\x00\x00\x04"


def test_start_up_packets() -> None:
    # 80877103 = 1234 << 16 | 5679 and so on (55.7 SSLRequest, GSSENCRequest, CancelRequest).
    assert fe.ssl_request() == b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
    assert fe.gssenc_request() == b"\x00\x00\x00\x08\x04\xd2\x16\x30"
    assert (
        fe.cancel_request(1234, 0xDEADBEEF)
        == b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x04\xd2\xde\xad\xbe\xef"
    )
    packet = fe.startup({"user": "app", "database": "db"})
    assert packet == b"\x00\x00\x00\x1e\x00\x03\x00\x00user\x00app\x00database\x00db\x00\x00"
    assert fe.decode_startup(packet) == fe.StartupMessage(196608, {"user": "app", "database": "db"})
    assert fe.decode_startup(fe.ssl_request()) == fe.SSLRequest()
    assert fe.decode_startup(fe.gssenc_request()) == fe.GSSENCRequest()
    assert fe.decode_startup(fe.cancel_request(7, 9)) == fe.CancelRequest(7, 9)


def test_startup_defaults_and_special_params() -> None:
    msg = fe.decode_startup(fe.startup({"user": "u", "options": "-c x=1", "replication": "database"}))
    assert isinstance(msg, fe.StartupMessage)
    assert msg.user == "u" and msg.database == "u"  # database defaults to the user name
    assert msg.params["replication"] == "database" and msg.params["options"] == "-c x=1"


@pytest.mark.parametrize(
    ("packet", "sqlstate"),
    [
        (b"\x00\x00\x00\x09\x00\x03\x00\x00\x00", "28000"),  # no user
        (b"\x00\x00\x00\x0f\x00\x03\x00\x00user\x00u\x00", "08P01"),  # no final terminator
        (b"\x00\x00\x00\x11\x00\x03\x00\x00user\x00u\x00\x00\x00", "08P01"),  # trailing bytes
        (b"\x00\x00\x00\x10\x00\x02\x00\x00user\x00u\x00\x00", "0A000"),  # protocol 2.0
        (b"\x00\x00\x00\x10\x00\x03\x00\x00user\x00\xff\x00\x00", "22021"),  # bad UTF-8
        (b"\x00\x00\x00\x09\x04\xd2\x16\x2f\x00", "08P01"),  # SSLRequest with a body
        (b"\x00\x00\x00\x0c\x04\xd2\x16\x2e\x00\x00\x00\x01", "08P01"),  # short CancelRequest
        (b"\x00\x00\x00\x09\x04\xd2\x16\x2f", "08P01"),  # length word disagrees with the packet
        (b"\x00\x00", "08P01"),
    ],
)
def test_decode_startup_refuses(packet: bytes, sqlstate: str) -> None:
    with pytest.raises(ProtocolError) as info:
        fe.decode_startup(packet)
    assert info.value.sqlstate == sqlstate


def test_options_parameter() -> None:
    # 55.7 StartupMessage: spaces separate arguments unless escaped with a backslash.
    assert fe.split_options(r"-c search_path=a\ b  --work-mem=4MB -c\ x\\y") == [
        "-c",
        "search_path=a b",
        "--work-mem=4MB",
        "-c x\\y",
    ]
    assert fe.split_options("  \t ") == []
    assert fe.options_settings("-c search_path=s1 --work-mem=4MB -cstatement_timeout=5") == {
        "search_path": "s1",
        "work_mem": "4MB",
        "statement_timeout": "5",
    }
    with pytest.raises(ProtocolError) as info:
        fe.options_settings("-c geqo")
    assert info.value.sqlstate == "42601"
    with pytest.raises(ProtocolError) as info:
        fe.options_settings("-B 100")
    assert info.value.sqlstate == "0A000"


def test_query_parse_bind_execute_vectors() -> None:
    assert fe.query("SELECT 1") == b"Q\x00\x00\x00\x0dSELECT 1\x00"
    assert fe.parse("s1", "select $1", [23]) == (
        b"P\x00\x00\x00\x17s1\x00select $1\x00\x00\x01\x00\x00\x00\x17"
    )
    assert fe.bind("", "s1", [1], [b"\x00\x00\x00\x2a", None], []) == (
        b"B\x00\x00\x00\x1c\x00s1\x00\x00\x01\x00\x01\x00\x02"
        b"\x00\x00\x00\x04\x00\x00\x00\x2a\xff\xff\xff\xff\x00\x00"
    )
    assert fe.execute() == b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00"
    assert fe.describe(b"S", "s1") == b"D\x00\x00\x00\x08Ss1\x00"
    assert fe.close(b"P", "") == b"C\x00\x00\x00\x06P\x00"


def test_decode_typed_frontend_messages() -> None:
    cases: list[tuple[bytes, fe.FrontendMessage]] = [
        (fe.query("select 'é'"), fe.Query("select 'é'")),
        (fe.parse("", "select $1, $2", [0, 4294967295]), fe.Parse("", "select $1, $2", (0, 4294967295))),
        (fe.bind("p", "s", [0, 1], [b"1", None]), fe.Bind("p", "s", (0, 1), (b"1", None), ())),
        (fe.describe(b"P", "p"), fe.Describe(b"P", "p")),
        (fe.execute("p", 10), fe.Execute("p", 10)),
        (fe.close(b"S", "s"), fe.Close(b"S", "s")),
        (fe.SYNC, fe.Sync()),
        (fe.FLUSH, fe.Flush()),
        (fe.TERMINATE, fe.Terminate()),
        (fe.copy_data(b"1\t2\n"), fe.CopyData(b"1\t2\n")),
        (fe.COPY_DONE, fe.CopyDone()),
        (fe.copy_fail("stop"), fe.CopyFail("stop")),
        (fe.function_call(1598, [1], [b"ab", None], 1), fe.FunctionCall(1598, (1,), (b"ab", None), 1)),
        (fe.password("md5abc"), fe.AuthenticationResponse(b"md5abc\x00")),
    ]
    for encoded, expected in cases:
        assert fe.decode_frontend(*body_of(encoded)) == expected


def test_authentication_responses_share_type_p() -> None:
    _, body = body_of(fe.password("secret"))
    assert fe.decode_password(body) == "secret"
    msg_type, body = body_of(fe.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc"))
    assert msg_type == ord("p")
    assert body == b"SCRAM-SHA-256\x00\x00\x00\x00\x0bn,,n=,r=abc"
    assert fe.decode_sasl_initial_response(body) == fe.SASLInitialResponse("SCRAM-SHA-256", b"n,,n=,r=abc")
    _, body = body_of(fe.sasl_initial_response("SCRAM-SHA-256", None))
    assert fe.decode_sasl_initial_response(body) == fe.SASLInitialResponse("SCRAM-SHA-256", None)
    _, body = body_of(fe.sasl_response(b"c=biws,r=abc,p=xyz"))
    assert fe.decode_sasl_response(body) == b"c=biws,r=abc,p=xyz"
    assert fe.gss_response(b"tok") == b"p\x00\x00\x00\x07tok"


def test_bind_param_format_rule() -> None:
    assert fe.Bind("", "", (), (b"1", b"2"), ()).param_format(1) == 0
    assert fe.Bind("", "", (1,), (b"1", b"2"), ()).param_format(1) == 1
    assert fe.Bind("", "", (0, 1), (b"1", b"2"), ()).param_format(1) == 1


@pytest.mark.parametrize(
    ("msg_type", "body", "sqlstate"),
    [
        (b"Q", b"select 1", "08P01"),  # missing NUL
        (b"Q", b"select 1\x00x", "08P01"),  # trailing garbage
        (b"Q", b"select '\xc3\x28'\x00", "22021"),  # invalid UTF-8
        (b"P", b"\x00select\x00\x00\x02\x00\x00\x00\x17", "08P01"),  # two OIDs promised, one sent
        (b"B", b"\x00\x00\x00\x00\x00\x01\xff\xff\xff\xfe\x00\x00", "08P01"),  # length -2
        (
            b"B",
            b"\x00\x00\x00\x02\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00",
            "08P01",
        ),  # 2 formats, 1 param
        (b"B", b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x05ab\x00\x00", "08P01"),  # value overruns
        (b"D", b"X\x00", "08P01"),  # Describe of neither statement nor portal
        (b"C", b"", "08P01"),
        (b"E", b"\x00\x00\x00", "08P01"),  # short Int32
        (b"S", b"\x00", "08P01"),  # Sync has no body
        (b"F", b"\x00\x00\x00\x01\x00\x00\x00\x00", "08P01"),  # no result format
        (b"z", b"", "08P01"),  # no such message
    ],
)
def test_decode_frontend_refuses(msg_type: bytes, body: bytes, sqlstate: str) -> None:
    with pytest.raises(ProtocolError) as info:
        fe.decode_frontend(msg_type[0], body)
    assert info.value.sqlstate == sqlstate


def test_sasl_initial_response_length_rules() -> None:
    with pytest.raises(ProtocolError):
        fe.decode_sasl_initial_response(b"SCRAM-SHA-256\x00\xff\xff\xff\xfe")
    with pytest.raises(ProtocolError):
        fe.decode_sasl_initial_response(b"SCRAM-SHA-256\x00\x00\x00\x00\x05abc")


def test_encoders_refuse_what_cannot_be_framed() -> None:
    with pytest.raises(ValueError):
        fe.query("select 1\x00; drop table t")
    with pytest.raises(ValueError):
        fe.describe(b"X", "s")
    with pytest.raises(ValueError):
        be.ready_for_query(b"X")
    with pytest.raises(ValueError):
        be.authentication_md5(b"abc")
    with pytest.raises(TypeError):
        be.error_response("XX000", "boom", colour="red")
    with pytest.raises(ValueError):
        be.error_response_from_fields({"MM": "two letters"})


def test_decoders_accept_buffers() -> None:
    assert fe.decode_query(memoryview(b"select 1\x00")) == "select 1"
    assert fe.decode_parse(bytearray(b"\x00x\x00\x00\x00")) == fe.Parse("", "x", ())
    assert be.decode_data_row(memoryview(b"\x00\x01\x00\x00\x00\x01a")) == (b"a",)


# --- Backend: known vectors ----------------------------------------------------------------------


def test_constant_backend_messages() -> None:
    assert be.authentication_ok() == be.AUTH_OK == b"R\x00\x00\x00\x08\x00\x00\x00\x00"
    assert be.parse_complete() == be.PARSE_COMPLETE == b"1\x00\x00\x00\x04"
    assert be.bind_complete() == be.BIND_COMPLETE == b"2\x00\x00\x00\x04"
    assert be.close_complete() == be.CLOSE_COMPLETE == b"3\x00\x00\x00\x04"
    assert be.no_data() == be.NO_DATA == b"n\x00\x00\x00\x04"
    assert be.empty_query_response() == be.EMPTY_QUERY_RESPONSE == b"I\x00\x00\x00\x04"
    assert be.portal_suspended() == be.PORTAL_SUSPENDED == b"s\x00\x00\x00\x04"
    assert be.copy_done() == be.COPY_DONE == b"c\x00\x00\x00\x04"
    assert be.ready_for_query(b"I") == be.READY_IDLE == b"Z\x00\x00\x00\x05I"
    assert be.ready_for_query(b"T") == be.READY_IN_TRANSACTION == b"Z\x00\x00\x00\x05T"
    assert be.ready_for_query(b"E") == be.READY_FAILED == b"Z\x00\x00\x00\x05E"


def test_authentication_vectors() -> None:
    assert be.authentication_cleartext() == b"R\x00\x00\x00\x08\x00\x00\x00\x03"
    assert be.authentication_md5(b"\x01\x02\x03\x04") == b"R\x00\x00\x00\x0c\x00\x00\x00\x05\x01\x02\x03\x04"
    sasl = be.authentication_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"])
    assert sasl == b"R\x00\x00\x00\x2a\x00\x00\x00\x0aSCRAM-SHA-256-PLUS\x00SCRAM-SHA-256\x00\x00"
    cases: list[tuple[bytes, be.Authentication]] = [
        (be.AUTH_OK, be.AuthenticationOk()),
        (be.authentication_kerberos_v5(), be.AuthenticationKerberosV5()),
        (be.authentication_cleartext(), be.AuthenticationCleartextPassword()),
        (be.authentication_md5(b"salt"), be.AuthenticationMD5Password(b"salt")),
        (be.authentication_gss(), be.AuthenticationGSS()),
        (be.authentication_gss_continue(b"tok"), be.AuthenticationGSSContinue(b"tok")),
        (be.authentication_sspi(), be.AuthenticationSSPI()),
        (sasl, be.AuthenticationSASL(("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"))),
        (
            be.authentication_sasl_continue(b"r=x,s=y,i=4096"),
            be.AuthenticationSASLContinue(b"r=x,s=y,i=4096"),
        ),
        (be.authentication_sasl_final(b"v=abc"), be.AuthenticationSASLFinal(b"v=abc")),
    ]
    for encoded, expected in cases:
        msg_type, body = body_of(encoded)
        assert be.decode_backend(msg_type, body) == expected == be.decode_authentication(body)


def test_authentication_refusals() -> None:
    for body in (b"\x00\x00\x00\x06", b"\x00\x00\x00\x05abc", b"\x00\x00\x00\x00x", b"\x00\x00\x00\x0aSCRAM"):
        with pytest.raises(ProtocolError):
            be.decode_authentication(body)


def test_error_response_carries_both_severities() -> None:
    encoded = be.error_response("42P01", 'relation "t" does not exist', position=15, hint="create it")
    assert encoded == (
        b"E\x00\x00\x00\x46SERROR\x00VERROR\x00C42P01\x00M"
        b'relation "t" does not exist\x00Hcreate it\x00P15\x00\x00'
    )
    msg_type, body = body_of(encoded)
    message = be.decode_backend(msg_type, body)
    assert isinstance(message, be.ErrorResponse)
    assert (message.severity, message.sqlstate, message.message) == (
        "ERROR",
        "42P01",
        'relation "t" does not exist',
    )
    assert message.fields["P"] == "15" and message.fields["H"] == "create it"
    assert be.error_response_from_fields(be.decode_error_fields(body)) == encoded


def test_notice_response_and_unknown_fields_kept() -> None:
    encoded = be.notice_response("01000", "careful", severity="WARNING", detail="d")
    msg_type, body = body_of(encoded)
    assert msg_type == ord("N")
    message = be.decode_backend(msg_type, body)
    assert isinstance(message, be.NoticeResponse) and message.severity == "WARNING"
    # 55.8: frontends ignore unknown field types; a proxy keeps them to pass on.
    assert be.decode_error_fields(b"Zfuture\x00Mm\x00\x00") == {"Z": "future", "M": "m"}
    for bad in (b"Mm\x00", b"Mm", b"Mm\x00\x00x"):
        with pytest.raises(ProtocolError):
            be.decode_error_fields(bad)


def test_row_description_and_data_row_vectors() -> None:
    # What PostgreSQL sends for SELECT 1: "?column?", int4 (OID 23, size 4, typmod -1), text format.
    field = be.FieldDescription("?column?", 0, 0, 23, 4, -1, 0)
    encoded = be.row_description([field])
    assert encoded == (
        b"T\x00\x00\x00\x21\x00\x01?column?\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x17\x00\x04"
        b"\xff\xff\xff\xff\x00\x00"
    )
    assert be.decode_backend(*body_of(encoded)) == be.RowDescription((field,))
    row = be.data_row([b"1", None, b""])
    assert row == b"D\x00\x00\x00\x13\x00\x03\x00\x00\x00\x011\xff\xff\xff\xff\x00\x00\x00\x00"
    assert be.decode_backend(*body_of(row)) == be.DataRow((b"1", None, b""))
    for bad in (b"\x00", b"\x00\x02\x00\x00\x00\x00", b"\x00\x01\xff\xff\xff\xfe", b"\x00\x00x"):
        with pytest.raises(ProtocolError):
            be.decode_data_row(bad)


def test_other_backend_messages_round_trip() -> None:
    cases: list[tuple[bytes, be.BackendMessage]] = [
        (be.parameter_status("server_version", "15.8"), be.ParameterStatus("server_version", "15.8")),
        (be.backend_key_data(4242, 0xFFFFFFFF), be.BackendKeyData(4242, 0xFFFFFFFF)),
        (be.command_complete("INSERT 0 1"), be.CommandComplete("INSERT 0 1")),
        (be.parameter_description([23, 25]), be.ParameterDescription((23, 25))),
        (be.copy_in_response(0, [0, 0]), be.CopyInResponse(0, (0, 0))),
        (be.copy_out_response(1, [1]), be.CopyOutResponse(1, (1,))),
        (be.copy_both_response(0, []), be.CopyBothResponse(0, ())),
        (be.copy_data(b"row\n"), be.CopyData(b"row\n")),
        (be.notification_response(99, "ch", "payload"), be.NotificationResponse(99, "ch", "payload")),
        (be.function_call_response(None), be.FunctionCallResponse(None)),
        (be.function_call_response(b"x"), be.FunctionCallResponse(b"x")),
        (be.negotiate_protocol_version(0, ["_pq_.x"]), be.NegotiateProtocolVersion(0, ("_pq_.x",))),
        (be.PARSE_COMPLETE, be.ParseComplete()),
        (be.BIND_COMPLETE, be.BindComplete()),
        (be.CLOSE_COMPLETE, be.CloseComplete()),
        (be.NO_DATA, be.NoData()),
        (be.EMPTY_QUERY_RESPONSE, be.EmptyQueryResponse()),
        (be.PORTAL_SUSPENDED, be.PortalSuspended()),
        (be.COPY_DONE, be.CopyDone()),
        (be.READY_FAILED, be.ReadyForQuery(b"E")),
    ]
    for encoded, expected in cases:
        assert be.decode_backend(*body_of(encoded)) == expected


@pytest.mark.parametrize(
    ("msg_type", "body"),
    [
        (b"Z", b"X"),  # no such transaction status
        (b"Z", b"II"),
        (b"1", b"\x00"),
        (b"K", b"\x00\x00\x00\x01"),
        (b"T", b"\x00\x01name\x00\x00\x00"),  # field cut short
        (b"T", b"\x00\x02" + b"\x00" * 19),  # two fields promised, one sent
        (b"v", b"\x00\x00\x00\x00\x7f\xff\xff\xff"),  # option count far beyond the body
        (b"v", b"\x00\x00\x00\x00\xff\xff\xff\xff"),  # negative count
        (b"G", b"\x00\x00\x01"),
        (b"A", b"\x00\x00\x00\x01ch\x00"),
        (b"?", b""),
    ],
)
def test_decode_backend_refuses(msg_type: bytes, body: bytes) -> None:
    with pytest.raises(ProtocolError):
        be.decode_backend(msg_type[0], body)


def test_ssl_answers_are_single_bytes() -> None:
    assert (be.SSL_ACCEPTED, be.SSL_REFUSED, be.GSSENC_ACCEPTED, be.GSSENC_REFUSED) == (
        b"S",
        b"N",
        b"G",
        b"N",
    )
