"""COPY FROM STDIN data cut into rows, and each row's key field read, exactly as PostgreSQL reads it
(copyfromparse.c): text, CSV and binary.

A row may span CopyData messages (and, in CSV, lines: quoted fields hold newlines), so a splitter
is fed the client's bytes as they come and returns the rows completed so far, each with its raw
bytes (terminator included, to be forwarded untouched) and its key field's value. The end-of-copy
marker `\\.` ends the data; whatever follows it is ignored, as PostgreSQL ignores it. Line-ending
style is checked as PostgreSQL checks it, so a file mixing styles fails here, not on a shard.

Data in a client encoding other than UTF8: PostgreSQL converts each line to the server's encoding
before it cuts fields and undoes escapes, so a text key is converted here first too (`to_utf8`),
and the escapes of the text format then give bytes of the server's encoding, as they do there.
Cutting lines byte by byte is exact for every encoding whose multibyte characters hold no ASCII
bytes; for the others (`ascii_only`) text and CSV data must be ASCII.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable

from proxy.copy_options import CopyOptions, applies_to
from proxy.pg_encoding import EncodingError

Row = tuple[bytes, bytes | None]  # (raw bytes to forward, key value; None for SQL NULL)
_NL, _CR, _CRNL = "nl", "cr", "crnl"
_BACKSLASH, _DOT, _LF, _CRB = 0x5C, 0x2E, 0x0A, 0x0D
_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
_INT16, _INT32 = struct.Struct("!h"), struct.Struct("!i")
_TEXT_ESCAPE = re.compile(rb"\\(?:([0-7]{1,3})|x([0-9A-Fa-f]{1,2})|(.))", re.S)
_TEXT_ESCAPES = {b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"v": b"\v"}
_BAD_FORMAT = "22P04"  # bad_copy_file_format


class CopyDataError(Exception):
    """The data is not what PostgreSQL would accept (or the key cannot be read): the COPY fails."""

    def __init__(self, message: str, sqlstate: str = _BAD_FORMAT) -> None:
        super().__init__(message)
        self.sqlstate, self.message = sqlstate, message


class Splitter:
    """Rows out of a COPY data stream; `header` (sent to every shard) once the first line is read.

    `to_utf8` converts a key field from the data's encoding to the server's (text keys in a client
    encoding other than UTF8); `ascii_only` names an encoding whose text and CSV data must be ASCII.
    """

    def __init__(self, options: CopyOptions, key_index: int, key_column: str) -> None:
        self.options = options
        self.key_index = key_index
        self.key_column = key_column
        self.header: bytes | None = None
        self.footer = b""  # bytes every shard gets after its rows (the binary trailer)
        self.ended = False  # the end-of-copy marker was seen
        self._want_header = options.header
        self._to_utf8: Callable[[bytes], bytes] | None = None
        self._ascii_only: str | None = None

    def feed(self, data: bytes) -> list[Row]:
        raise NotImplementedError

    def finish(self) -> list[Row]:
        """The client's CopyDone: the last row may end without a newline."""
        raise NotImplementedError

    def _missing(self) -> CopyDataError:
        return CopyDataError(f'missing data for column "{self.key_column}"')

    def _convert(self, raw: bytes) -> bytes:
        """A key field as the server will have it after converting the client's encoding."""
        assert self._to_utf8 is not None
        try:
            return self._to_utf8(raw)
        except EncodingError as exc:
            raise CopyDataError(exc.message, exc.sqlstate) from None

    def _check_ascii(self, data: bytes) -> None:
        if self._ascii_only is not None and not data.isascii():
            raise CopyDataError(
                f"COPY data with non-ASCII characters in client encoding {self._ascii_only} over several "
                "shards is not supported: its multibyte characters hide ASCII bytes, so rows cannot be cut "
                "as PostgreSQL cuts them; use client_encoding UTF8 or FORMAT binary",
                "0A000",
            )


class _LineSplitter(Splitter):
    """Text and CSV: rows are lines (logical ones in CSV), checked for one line-ending style."""

    def __init__(self, options: CopyOptions, key_index: int, key_column: str) -> None:
        super().__init__(options, key_index, key_column)
        self._buf = b""
        self._scan = 0  # how far the pending line has been scanned
        self.eol: str | None = None
        self._what = "literal"  # PostgreSQL's word in its messages: "literal" (text), "unquoted" (CSV)

    def feed(self, data: bytes) -> list[Row]:
        if self.ended:
            return []
        self._check_ascii(data)
        self._buf = self._buf + data if self._buf else data
        return self._lines(final=False)

    def finish(self) -> list[Row]:
        if self.ended:
            return []
        return self._lines(final=True)

    def _lines(self, final: bool) -> list[Row]:
        raise NotImplementedError

    def _row(self, line: bytes, content_end: int) -> Row | None:
        """A completed line: the header (kept aside) or a row."""
        if self._want_header:
            self._want_header = False
            self.header = line
            return None
        return line, self.key(line[:content_end])

    def key(self, content: bytes) -> bytes | None:
        raise NotImplementedError

    def _newline(self, buf: bytes, i: int, final: bool) -> int | None:
        """A line ends at buf[i] (CR or LF outside quotes): the index past its terminator, None if
        the byte after a CR is still to come."""
        if buf[i] == _LF:
            if self.eol in (_CR, _CRNL):
                raise CopyDataError(f"{self._what} newline found in data")
            self.eol = _NL
            return i + 1
        if self.eol is None or self.eol == _CRNL:
            if i + 1 >= len(buf):
                if not final:
                    return None
                if self.eol == _CRNL:
                    raise CopyDataError(f"{self._what} carriage return found in data")
                self.eol = _CR
                return i + 1
            if buf[i + 1] == _LF:
                self.eol = _CRNL
                return i + 2
            if self.eol == _CRNL:
                raise CopyDataError(f"{self._what} carriage return found in data")
            self.eol = _CR
            return i + 1
        if self.eol == _NL:
            raise CopyDataError(f"{self._what} carriage return found in data")
        return i + 1

    def _end_marker(self, buf: bytes, i: int, final: bool, csv: bool) -> bool | None:
        """Is buf[i:] (a backslash and a dot) the end-of-copy marker? None: more bytes needed."""
        j = i + 2
        if self.eol == _CRNL:
            if j >= len(buf):
                return None if not final else self._not_marker(csv, "end-of-copy marker corrupt")
            if buf[j] == _LF:
                return self._not_marker(csv, "end-of-copy marker does not match previous newline style")
            if buf[j] != _CRB:
                return self._not_marker(csv, "end-of-copy marker corrupt")
            j += 1
        if j >= len(buf):
            return None if not final else self._not_marker(csv, "end-of-copy marker corrupt")
        c2 = buf[j]
        if c2 not in (_CRB, _LF):
            return self._not_marker(csv, "end-of-copy marker corrupt")
        if (self.eol in (_NL, _CRNL) and c2 != _LF) or (self.eol == _CR and c2 != _CRB):
            raise CopyDataError("end-of-copy marker does not match previous newline style")
        return True

    @staticmethod
    def _not_marker(csv: bool, message: str) -> bool:
        if csv:
            return False  # in CSV `\.` not alone on its line is data
        raise CopyDataError(message)


class TextSplitter(_LineSplitter):
    """The text format: a backslash escapes the next byte, newline included."""

    def __init__(self, options: CopyOptions, key_index: int, key_column: str) -> None:
        super().__init__(options, key_index, key_column)
        self._special = re.compile(rb"[\\\r\n]")

    def _lines(self, final: bool) -> list[Row]:
        buf = self._buf
        rows: list[Row] = []
        start, pos = 0, self._scan
        if self.eol in (None, _NL) and b"\\" not in buf and b"\r" not in buf:  # the common case, fast
            end = buf.rfind(b"\n")
            if end >= 0:
                self.eol = _NL
                for line in buf[: end + 1].splitlines(keepends=True):
                    row = self._row(line, len(line) - 1)
                    if row is not None:
                        rows.append(row)
                start = pos = end + 1
        search = self._special.search
        while True:
            m = search(buf, pos)
            if m is None:
                pos = len(buf)
                break
            i = m.start()
            c = buf[i]
            if c == _BACKSLASH:
                if i + 1 >= len(buf):
                    pos = i if not final else len(buf)
                    break
                if buf[i + 1] != _DOT:
                    pos = i + 2
                    continue
                marker = self._end_marker(buf, i, final, csv=False)
                if marker is None:
                    pos = i
                    break
                if i > start:
                    row = self._row(buf[start:i], i - start)
                    if row is not None:
                        rows.append(row)
                self.ended = True
                self._buf = b""
                return rows
            after = self._newline(buf, i, final)
            if after is None:
                pos = i
                break
            line = buf[start:after]
            row = self._row(line, i - start)
            if row is not None:
                rows.append(row)
            start = pos = after
        if final and start < len(buf):
            row = self._row(buf[start:], len(buf) - start)
            if row is not None:
                rows.append(row)
            start = len(buf)
        self._buf = buf[start:]
        self._scan = pos - start
        return rows

    def key(self, content: bytes) -> bytes | None:
        delimiter, index = self.options.delimiter, self.key_index
        if b"\\" not in content:
            fields = content.split(delimiter, index + 1)
            if index >= len(fields):
                raise self._missing()
            raw = fields[index] if self._to_utf8 is None else self._convert(fields[index])
            return None if raw == self.options.null else raw
        raw_field = _text_field(content, delimiter[0], index)
        if raw_field is None:
            raise self._missing()
        if self._to_utf8 is not None:  # before the escapes, which give bytes of the server's encoding
            raw_field = self._convert(raw_field)
        if raw_field == self.options.null:
            return None
        return _text_unescape(raw_field)


def _text_field(content: bytes, delimiter: int, index: int) -> bytes | None:
    """The raw (still escaped) field `index` of a text-format line; None if it has fewer fields."""
    field, start, i, n = 0, 0, 0, len(content)
    while i < n:
        c = content[i]
        if c == _BACKSLASH:
            i += 2
            continue
        if c == delimiter:
            if field == index:
                return content[start:i]
            field += 1
            start = i + 1
        i += 1
    return content[start:] if field == index else None


def _text_unescape(raw: bytes) -> bytes:
    """A text-format field's value (CopyReadAttributesText); a lone backslash at the end is dropped."""

    def one(m: re.Match[bytes]) -> bytes:
        octal, hex2, other = m.groups()
        if octal or hex2:
            return bytes((int(octal, 8) & 0xFF if octal else int(hex2, 16),))
        return _TEXT_ESCAPES.get(other, other)

    if (len(raw) - len(raw.rstrip(b"\\"))) % 2:
        raw = raw[:-1]
    return _TEXT_ESCAPE.sub(one, raw)


class CsvSplitter(_LineSplitter):
    """CSV: quoted fields may hold delimiters, quotes (doubled or escaped) and newlines."""

    def __init__(self, options: CopyOptions, key_index: int, key_column: str) -> None:
        super().__init__(options, key_index, key_column)
        self._what = "unquoted"
        self.quote = options.quote[0]
        escape = options.escape[0]
        self.escape = escape if escape != self.quote else -1  # as PostgreSQL: one char, no escaping
        self._in_quote = False
        self._last_was_esc = False
        q, e = re.escape(options.quote), re.escape(options.escape)
        self._outside = re.compile(rb"[" + q + rb"\r\n]")
        self._inside = re.compile(rb"[" + q + (e if self.escape >= 0 else b"") + rb"]")
        self._force_null = applies_to(options.force_null, key_column)
        self._force_not_null = applies_to(options.force_not_null, key_column)

    def _lines(self, final: bool) -> list[Row]:
        buf = self._buf
        rows: list[Row] = []
        quote, escape = self.quote, self.escape
        start, pos = 0, self._scan
        in_quote, last_was_esc = self._in_quote, self._last_was_esc
        if (
            not in_quote
            and self.eol in (None, _NL)
            and self.options.quote not in buf
            and b"\r" not in buf
            and b"\\" not in buf
        ):  # no quoting, no CR, no end marker: plain lines, fast
            end = buf.rfind(b"\n")
            if end >= 0:
                self.eol = _NL
                for line in buf[: end + 1].splitlines(keepends=True):
                    row = self._row(line, len(line) - 1)
                    if row is not None:
                        rows.append(row)
                start = pos = end + 1
        outside, inside = self._outside.search, self._inside.search
        while True:
            if pos == start and not in_quote and pos < len(buf) and buf[pos] == _BACKSLASH:
                if pos + 1 >= len(buf) and not final:
                    break
                if pos + 1 < len(buf) and buf[pos + 1] == _DOT:
                    marker = self._end_marker(buf, pos, final, csv=True)
                    if marker is None:
                        break
                    if marker:
                        self.ended = True
                        self._buf = b""
                        return rows
            if in_quote:
                m = inside(buf, pos)
                if m is None:
                    if len(buf) > pos:
                        last_was_esc = False
                    pos = len(buf)
                    break
                i = m.start()
                if i > pos:
                    last_was_esc = False
                c = buf[i]
                if c == escape:
                    last_was_esc = not last_was_esc
                else:  # the quote
                    if not last_was_esc:
                        in_quote = False
                    last_was_esc = False
                pos = i + 1
                continue
            m = outside(buf, pos)
            if m is None:
                pos = len(buf)
                break
            i = m.start()
            if buf[i] == quote:
                in_quote = True
                pos = i + 1
                continue
            after = self._newline(buf, i, final)
            if after is None:
                pos = i
                break
            row = self._row(buf[start:after], i - start)
            if row is not None:
                rows.append(row)
            start = pos = after
        if final and start < len(buf):
            row = self._row(buf[start:], len(buf) - start)
            if row is not None:
                rows.append(row)
            start = len(buf)
            in_quote = last_was_esc = False
        self._buf = buf[start:]
        self._scan = pos - start
        self._in_quote, self._last_was_esc = in_quote, last_was_esc
        return rows

    def key(self, content: bytes) -> bytes | None:
        opts = self.options
        found = csv_field(content, self.key_index, opts.delimiter[0], self.quote, opts.escape[0])
        if found is None:
            raise self._missing()
        value, quoted = found
        if self._to_utf8 is not None:
            value = self._convert(value)
        if not quoted and value == opts.null:
            return opts.null if self._force_not_null else None
        if quoted and self._force_null and value == opts.null:
            return None
        return value


def csv_field(line: bytes, index: int, delimiter: int, quote: int, escape: int) -> tuple[bytes, bool] | None:
    """Field `index` of a CSV line (CopyReadAttributesCSV): its value and whether it was quoted;
    None if the line has fewer fields."""
    if quote not in line:
        fields = line.split(bytes((delimiter,)), index + 1)
        return (fields[index], False) if index < len(fields) else None
    n, i, field = len(line), 0, 0
    while True:
        out = bytearray()
        saw_quote = in_quote = found_delimiter = False
        while True:
            if not in_quote:
                if i >= n:
                    break
                c = line[i]
                i += 1
                if c == delimiter:
                    found_delimiter = True
                    break
                if c == quote:
                    saw_quote = in_quote = True
                    continue
                out.append(c)
                continue
            if i >= n:
                raise CopyDataError("unterminated CSV quoted field")
            c = line[i]
            i += 1
            if c == escape and i < n and line[i] in (escape, quote):
                out.append(line[i])
                i += 1
            elif c == quote:
                in_quote = False
            else:
                out.append(c)
        if field == index:
            return bytes(out), saw_quote
        if not found_delimiter:
            return None
        field += 1


class BinarySplitter(Splitter):
    """The binary format: a header, tuples of length-prefixed fields, a -1 trailer."""

    def __init__(self, options: CopyOptions, key_index: int, key_column: str) -> None:
        super().__init__(options, key_index, key_column)
        self._buf = b""
        self._want_header = True

    def feed(self, data: bytes) -> list[Row]:
        if self.ended:
            if data:
                raise CopyDataError("received copy data after EOF marker")
            return []
        buf = self._buf + data if self._buf else data
        rows: list[Row] = []
        pos, n = 0, len(buf)
        if self._want_header:
            if n < 19:
                self._buf = buf
                return rows
            if buf[:11] != _SIGNATURE:
                raise CopyDataError("COPY file signature not recognized")
            flags = _INT32.unpack_from(buf, 11)[0]
            if flags & (1 << 16):
                raise CopyDataError("invalid COPY file header (WITH OIDS)")
            extension = _INT32.unpack_from(buf, 15)[0]
            if extension < 0:
                raise CopyDataError("invalid COPY file header (negative length)")
            if n < 19 + extension:
                self._buf = buf
                return rows
            self.header = buf[: 19 + extension]
            self._want_header = False
            pos = 19 + extension
        key_index = self.key_index
        while n - pos >= 2:
            count = _INT16.unpack_from(buf, pos)[0]
            if count == -1:
                self.ended = True
                self.footer = b"\xff\xff"
                if n - pos > 2:
                    raise CopyDataError("received copy data after EOF marker")
                self._buf = b""
                return rows
            i = pos + 2
            key: bytes | None = None
            complete = True
            for field in range(count):
                if n - i < 4:
                    complete = False
                    break
                size = _INT32.unpack_from(buf, i)[0]
                i += 4
                if size < -1:
                    raise CopyDataError("invalid field size")
                if size == -1:
                    continue
                if n - i < size:
                    complete = False
                    break
                if field == key_index:
                    key = buf[i : i + size]
                i += size
            if not complete:
                break
            if count <= key_index:
                raise CopyDataError(f"row field count is {count}, expected more than {key_index}")
            if key is not None and self._to_utf8 is not None:  # textrecv converts from client_encoding
                key = self._convert(key)
            rows.append((buf[pos:i], key))
            pos = i
        self._buf = buf[pos:]
        return rows

    def finish(self) -> list[Row]:
        if self._buf and not self.ended:
            raise CopyDataError("unexpected EOF in COPY data")
        return []


def splitter_for(
    options: CopyOptions,
    key_index: int,
    key_column: str,
    to_utf8: Callable[[bytes], bytes] | None = None,
    ascii_only: str | None = None,
) -> Splitter:
    kind = {"text": TextSplitter, "csv": CsvSplitter, "binary": BinarySplitter}[options.format]
    splitter = kind(options, key_index, key_column)
    splitter._to_utf8 = to_utf8
    splitter._ascii_only = ascii_only if options.format != "binary" else None
    return splitter
