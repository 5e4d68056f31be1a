"""Renaming named statements to shared server-side names."""

from __future__ import annotations

from proxy import prepared
from proxy.protocol import frontend
from proxy.protocol.framing import iter_messages


def _body(message: bytes) -> bytes:
    return message[5:]


def test_same_statement_shares_a_server_name_across_clients() -> None:
    name_a, a = prepared.prepared_from_parse(_body(frontend.parse("s1", "select $1::int", [23])))
    name_b, b = prepared.prepared_from_parse(_body(frontend.parse("other", "select $1::int", [23])))
    _, c = prepared.prepared_from_parse(_body(frontend.parse("s1", "select $1::int", [20])))
    assert (name_a, name_b) == (b"s1", b"other")
    assert a.server_name == b.server_name != c.server_name
    decoded = frontend.decode_parse(_body(a.parse_message))
    assert decoded.name == a.server_name.decode()
    assert decoded.query == "select $1::int"


def test_bind_is_renamed_and_keeps_its_parameters() -> None:
    bind = frontend.bind("portal", "s1", [1], [b"\x00\x00\x00\x07", None], [0])
    renamed = prepared.rename_bind(_body(bind), b"pgs_abc")
    assert [m[0] for m in iter_messages(renamed)] == [ord("B")]
    decoded = frontend.decode_bind(_body(renamed))
    assert (decoded.portal, decoded.statement) == ("portal", "pgs_abc")
    assert decoded.params == [b"\x00\x00\x00\x07", None] or tuple(decoded.params) == (
        b"\x00\x00\x00\x07",
        None,
    )
    assert prepared.bind_statement_name(_body(bind)) == b"s1"
