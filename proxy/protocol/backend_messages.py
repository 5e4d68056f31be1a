"""The messages a PostgreSQL server sends (protocol 3.0), as values: what `backend.decode_backend` returns.

Kept apart from the codec in backend.py in the manner of h11's _events.py; import them through
`proxy.protocol.backend`, which offers every name here. Layouts: PostgreSQL protocol section 55.7
"Message Formats"; error and notice fields: 55.8 "Error and Notice Message Fields".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class FieldDescription(NamedTuple):
    """One column of a RowDescription (55.7): a tuple, so many can be built and compared cheaply."""

    name: str
    table_oid: int = 0  # 0 if the column is not a plain table column
    column_attr: int = 0  # attribute number in that table, else 0
    type_oid: int = 25  # text
    type_size: int = -1  # pg_type.typlen: negative for variable width
    type_modifier: int = -1  # pg_attribute.atttypmod, type-specific
    format: int = 0  # 0 text, 1 binary; always 0 in a Describe's answer


# --- Messages ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuthenticationOk:
    pass


@dataclass(frozen=True, slots=True)
class AuthenticationKerberosV5:
    pass


@dataclass(frozen=True, slots=True)
class AuthenticationCleartextPassword:
    pass


@dataclass(frozen=True, slots=True)
class AuthenticationMD5Password:
    salt: bytes  # 4 bytes


@dataclass(frozen=True, slots=True)
class AuthenticationGSS:
    pass


@dataclass(frozen=True, slots=True)
class AuthenticationGSSContinue:
    data: bytes


@dataclass(frozen=True, slots=True)
class AuthenticationSSPI:
    pass


@dataclass(frozen=True, slots=True)
class AuthenticationSASL:
    mechanisms: tuple[str, ...]  # in the server's order of preference


@dataclass(frozen=True, slots=True)
class AuthenticationSASLContinue:
    data: bytes


@dataclass(frozen=True, slots=True)
class AuthenticationSASLFinal:
    data: bytes


@dataclass(frozen=True, slots=True)
class BackendKeyData:
    pid: int
    secret: int


@dataclass(frozen=True, slots=True)
class ParseComplete:
    pass


@dataclass(frozen=True, slots=True)
class BindComplete:
    pass


@dataclass(frozen=True, slots=True)
class CloseComplete:
    pass


@dataclass(frozen=True, slots=True)
class NoData:
    pass


@dataclass(frozen=True, slots=True)
class EmptyQueryResponse:
    pass


@dataclass(frozen=True, slots=True)
class PortalSuspended:
    pass


@dataclass(frozen=True, slots=True)
class CopyDone:
    pass


@dataclass(frozen=True, slots=True)
class CopyData:
    data: bytes


@dataclass(frozen=True, slots=True)
class CommandComplete:
    tag: str  # "SELECT 5", "INSERT 0 1", ...


@dataclass(frozen=True, slots=True)
class CopyInResponse:
    format: int  # 0 text, 1 binary, for the whole copy
    column_formats: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class CopyOutResponse:
    format: int
    column_formats: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class CopyBothResponse:
    format: int
    column_formats: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class DataRow:
    values: tuple[bytes | None, ...]  # None is SQL NULL


@dataclass(frozen=True, slots=True)
class _Diagnostic:
    """ErrorResponse and NoticeResponse: fields keyed by their one-letter code (55.8)."""

    fields: dict[str, str]

    @property
    def severity(self) -> str:
        """The never-localized V field (PostgreSQL >= 9.6), else the localized S."""
        return self.fields.get("V") or self.fields.get("S", "")

    @property
    def sqlstate(self) -> str:
        return self.fields.get("C", "")

    @property
    def message(self) -> str:
        return self.fields.get("M", "")


@dataclass(frozen=True, slots=True)
class ErrorResponse(_Diagnostic):
    pass


@dataclass(frozen=True, slots=True)
class NoticeResponse(_Diagnostic):
    pass


@dataclass(frozen=True, slots=True)
class FunctionCallResponse:
    value: bytes | None


@dataclass(frozen=True, slots=True)
class NegotiateProtocolVersion:
    newest_minor: int  # the newest minor version of the client's major version the server speaks
    unrecognized_options: tuple[str, ...]  # "_pq_." options the server did not recognise


@dataclass(frozen=True, slots=True)
class NotificationResponse:
    pid: int
    channel: str
    payload: str


@dataclass(frozen=True, slots=True)
class ParameterDescription:
    type_oids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ParameterStatus:
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class ReadyForQuery:
    status: bytes  # b"I" idle, b"T" in a transaction block, b"E" in a failed transaction block


@dataclass(frozen=True, slots=True)
class RowDescription:
    fields: tuple[FieldDescription, ...]


Authentication = (
    AuthenticationOk | AuthenticationKerberosV5 | AuthenticationCleartextPassword
    | AuthenticationMD5Password | AuthenticationGSS | AuthenticationGSSContinue | AuthenticationSSPI
    | AuthenticationSASL | AuthenticationSASLContinue | AuthenticationSASLFinal
)  # fmt: skip
BackendMessage = (
    Authentication | BackendKeyData | ParseComplete | BindComplete | CloseComplete | NoData
    | EmptyQueryResponse | PortalSuspended | CopyDone | CopyData | CommandComplete | CopyInResponse
    | CopyOutResponse | CopyBothResponse | DataRow | ErrorResponse | NoticeResponse
    | FunctionCallResponse | NegotiateProtocolVersion | NotificationResponse
    | ParameterDescription | ParameterStatus | ReadyForQuery | RowDescription
)  # fmt: skip

__all__ = [
    "Authentication",
    "AuthenticationCleartextPassword",
    "AuthenticationGSS",
    "AuthenticationGSSContinue",
    "AuthenticationKerberosV5",
    "AuthenticationMD5Password",
    "AuthenticationOk",
    "AuthenticationSASL",
    "AuthenticationSASLContinue",
    "AuthenticationSASLFinal",
    "AuthenticationSSPI",
    "BackendKeyData",
    "BackendMessage",
    "BindComplete",
    "CloseComplete",
    "CommandComplete",
    "CopyBothResponse",
    "CopyData",
    "CopyDone",
    "CopyInResponse",
    "CopyOutResponse",
    "DataRow",
    "EmptyQueryResponse",
    "ErrorResponse",
    "FieldDescription",
    "FunctionCallResponse",
    "NegotiateProtocolVersion",
    "NoData",
    "NoticeResponse",
    "NotificationResponse",
    "ParameterDescription",
    "ParameterStatus",
    "ParseComplete",
    "PortalSuspended",
    "ReadyForQuery",
    "RowDescription",
]
