"""Client encodings: how text a client sends in its client_encoding becomes the text PostgreSQL stores.

A text shard key is hashed over the bytes the server stores (UTF-8, `router.hashing`), but a client
whose client_encoding is not UTF8 sends other bytes, which the server converts on input. To place
such a row pgshard must convert the key as the server will. Python has codecs for most encodings,
but a codec is only used here where it decodes exactly as PostgreSQL's conversion does: each was
compared with `convert_from(bytes, encoding)` of PostgreSQL 15 over every one- and two-byte sequence
(and every four-byte one of GB18030). Where PostgreSQL and Python both accept a sequence they agree;
where only one accepts it the row fails (the server would refuse it, or pgshard refuses rather than
guess). EUC_JP, EUC_JIS_2004, SHIFT_JIS_2004 and BIG5 map some characters differently (wave dash,
fullwidth forms), and EUC_TW and MULE_INTERNAL have no Python codec: pgshard cannot convert them,
but ASCII is the same text in every client encoding PostgreSQL supports, so only non-ASCII keys are
refused there.

Client-only encodings (SJIS, BIG5, GBK, UHC, GB18030, JOHAB, SHIFT_JIS_2004) have multibyte
characters whose later bytes look like ASCII (a backslash, a quote): PostgreSQL steps over them while
cutting COPY lines (copyfromparse.c, `encoding_embeds_ascii`), and such data cannot be scanned byte
by byte as other encodings can.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

# PostgreSQL's canonical encoding name (as SHOW client_encoding gives it) -> an exact Python codec.
_CODECS = {
    "LATIN1": "latin_1",
    "LATIN2": "iso8859_2",
    "LATIN3": "iso8859_3",
    "LATIN4": "iso8859_4",
    "LATIN5": "iso8859_9",
    "LATIN6": "iso8859_10",
    "LATIN7": "iso8859_13",
    "LATIN8": "iso8859_14",
    "LATIN9": "iso8859_15",
    "LATIN10": "iso8859_16",
    "ISO_8859_5": "iso8859_5",
    "ISO_8859_6": "iso8859_6",
    "ISO_8859_7": "iso8859_7",
    "ISO_8859_8": "iso8859_8",
    "WIN866": "cp866",
    "WIN874": "cp874",
    "WIN1250": "cp1250",
    "WIN1251": "cp1251",
    "WIN1252": "cp1252",
    "WIN1253": "cp1253",
    "WIN1254": "cp1254",
    "WIN1255": "cp1255",
    "WIN1256": "cp1256",
    "WIN1257": "cp1257",
    "WIN1258": "cp1258",
    "KOI8R": "koi8_r",
    "KOI8U": "koi8_u",
    "EUC_CN": "gb2312",
    "EUC_KR": "euc_kr",
    "SJIS": "cp932",
    "GBK": "gbk",
    "UHC": "cp949",
    "GB18030": "gb18030",
    "JOHAB": "johab",
}
# Encodings PostgreSQL supports only on the client side; they embed ASCII bytes in multibyte characters.
_CLIENT_ONLY = frozenset({"SJIS", "SHIFT_JIS_2004", "BIG5", "GBK", "UHC", "GB18030", "JOHAB"})
_MULTIBYTE = frozenset({"EUC_CN", "EUC_KR"}) | _CLIENT_ONLY
# Text arrives as the server stores it (SQL_ASCII: no conversion, the server only checks it is UTF8).
_AS_IS = frozenset({"UTF8", "SQL_ASCII"})
_SERVER_ENCODINGS = frozenset(
    {"EUC_JP", "EUC_CN", "EUC_KR", "EUC_TW", "EUC_JIS_2004", "MULE_INTERNAL"} | set(_CODECS) - _CLIENT_ONLY
)


# src/common/encnames.c pg_encname_tbl: every name PostgreSQL accepts for an encoding, cleaned as
# clean_encoding_name does (ASCII letters and digits only, lower case) -> the canonical name.
_ALIASES = {
    "abc": "WIN1258", "alt": "WIN866", "big5": "BIG5", "euccn": "EUC_CN", "eucjis2004": "EUC_JIS_2004",
    "eucjp": "EUC_JP", "euckr": "EUC_KR", "euctw": "EUC_TW", "gb18030": "GB18030", "gbk": "GBK",
    "iso88591": "LATIN1", "iso885910": "LATIN6", "iso885913": "LATIN7", "iso885914": "LATIN8",
    "iso885915": "LATIN9", "iso885916": "LATIN10", "iso88592": "LATIN2", "iso88593": "LATIN3",
    "iso88594": "LATIN4", "iso88595": "ISO_8859_5", "iso88596": "ISO_8859_6", "iso88597": "ISO_8859_7",
    "iso88598": "ISO_8859_8", "iso88599": "LATIN5", "johab": "JOHAB", "koi8": "KOI8R", "koi8r": "KOI8R",
    "koi8u": "KOI8U", "latin1": "LATIN1", "latin10": "LATIN10", "latin2": "LATIN2", "latin3": "LATIN3",
    "latin4": "LATIN4", "latin5": "LATIN5", "latin6": "LATIN6", "latin7": "LATIN7", "latin8": "LATIN8",
    "latin9": "LATIN9", "mskanji": "SJIS", "muleinternal": "MULE_INTERNAL", "shiftjis": "SJIS",
    "shiftjis2004": "SHIFT_JIS_2004", "sjis": "SJIS", "sqlascii": "SQL_ASCII", "tcvn": "WIN1258",
    "tcvn5712": "WIN1258", "uhc": "UHC", "unicode": "UTF8", "utf8": "UTF8", "vscii": "WIN1258",
    "win": "WIN1251", "win1250": "WIN1250", "win1251": "WIN1251", "win1252": "WIN1252",
    "win1253": "WIN1253", "win1254": "WIN1254", "win1255": "WIN1255", "win1256": "WIN1256",
    "win1257": "WIN1257", "win1258": "WIN1258", "win866": "WIN866", "win874": "WIN874", "win932": "SJIS",
    "win936": "GBK", "win949": "UHC", "win950": "BIG5", "windows1250": "WIN1250",
    "windows1251": "WIN1251", "windows1252": "WIN1252", "windows1253": "WIN1253",
    "windows1254": "WIN1254", "windows1255": "WIN1255", "windows1256": "WIN1256",
    "windows1257": "WIN1257", "windows1258": "WIN1258", "windows866": "WIN866", "windows874": "WIN874",
    "windows932": "SJIS", "windows936": "GBK", "windows949": "UHC", "windows950": "BIG5",
}  # fmt: skip
_NOT_ALNUM = re.compile(r"[^A-Za-z0-9]")


def canonical_name(name: str) -> str:
    """PostgreSQL's canonical name for an encoding name as a client may spell it ('latin-1', 'unicode'),
    as SHOW client_encoding would report it; an unknown name is returned upper-cased (the server refuses
    it, so it never takes effect)."""
    return _ALIASES.get(_NOT_ALNUM.sub("", name).lower()) or name.upper()


class EncodingError(ValueError):
    """Text pgshard cannot convert as the server will: `sqlstate` says whether it is bad data or a
    limit of pgshard's."""

    def __init__(self, message: str, sqlstate: str) -> None:
        super().__init__(message)
        self.sqlstate, self.message = sqlstate, message


@dataclass(frozen=True, slots=True)
class ClientEncoding:
    """One client encoding, by PostgreSQL's canonical name."""

    name: str

    @property
    def as_is(self) -> bool:
        """Text in this encoding is already the bytes the server stores (UTF8 servers)."""
        return self.name in _AS_IS

    @property
    def embeds_ascii(self) -> bool:
        """Multibyte characters may hold ASCII bytes; an unknown encoding is assumed to."""
        return self.name not in _AS_IS and self.name not in _SERVER_ENCODINGS

    def to_utf8(self) -> Callable[[bytes], bytes]:
        """A function giving text in this encoding as UTF-8, as the server converts it; raises
        EncodingError (0A000 when pgshard cannot convert it exactly, else the server's error)."""
        name = self.name
        if name in _AS_IS:
            return _same
        codec = _CODECS.get(name)
        single_byte = codec is not None and name not in _MULTIBYTE  # every byte valid: a failure is unmapped

        def convert(raw: bytes) -> bytes:
            if raw.isascii():
                return raw
            if codec is None:
                raise EncodingError(
                    f"pgshard cannot convert non-ASCII text from client encoding {name} exactly as "
                    f"PostgreSQL does (to find its shard): {bytes(raw[:40])!r}; use client_encoding UTF8",
                    "0A000",
                )
            try:
                return raw.decode(codec).encode("utf-8")
            except UnicodeDecodeError as exc:
                bad = " ".join(f"0x{b:02x}" for b in raw[exc.start : exc.end])
                if single_byte:
                    raise EncodingError(
                        f'character with byte sequence {bad} in encoding "{name}" has no equivalent in '
                        'encoding "UTF8"',
                        "22P05",
                    ) from None
                raise EncodingError(f'invalid byte sequence for encoding "{name}": {bad}', "22021") from None

        return convert


def _same(raw: bytes) -> bytes:
    return raw
