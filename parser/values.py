"""Constants in a parsed statement, tied back to the fingerprint's literal list.

A plan must not hold values (it is shared by every statement with the same fingerprint), so a
constant is recorded as where it comes from: the fingerprint's literal #i (matched by its offset
in the text, and checked to be the same constant both scanners read), a $n parameter, or a
dollar-quoted constant that is part of the fingerprint itself.
"""

from __future__ import annotations

from collections.abc import Mapping

from sqlglot import exp
from sqlglot.dialects.dialect import Dialect

from parser.fingerprint import Literal, LiteralKind
from parser.plan import RefKind, ValueRef

_POSTGRES = Dialect.get_or_raise("postgres")


class ValueReader:
    """Reads value references off sqlglot nodes of one statement."""

    def __init__(self, literal_at: Mapping[int, tuple[int, Literal]], base: int = 0) -> None:
        self._literal_at = literal_at  # character offset in the full text -> (index, literal)
        self._base = base  # offset of the parsed text in the full text
        self.mismatch = False  # the scanners disagreed about a constant: the plan is value-specific

    def ref(self, node: exp.Expr) -> ValueRef | None:
        """Where a constant comes from, or None for anything that is not a constant."""
        node = unparen(node)
        cast = None
        if isinstance(node, exp.Cast):
            to = node.args.get("to")
            cast = to.sql(dialect=_POSTGRES).lower() if isinstance(to, exp.DataType) else None
            node = unparen(node.this)
            if cast is None or isinstance(node, exp.Cast):
                return None
        ref = self._plain_ref(node)
        if ref is None or cast is None:
            return ref
        return ValueRef(ref.kind, ref.index, ref.value, ref.negate, cast)

    def _plain_ref(self, node: exp.Expr) -> ValueRef | None:
        if isinstance(node, exp.Neg):
            inner = unparen(node.this)
            if isinstance(inner, exp.Literal) and not inner.is_string:
                ref = self._literal(inner, LiteralKind.NUMBER)
                return None if ref is None else ValueRef(RefKind.LITERAL, ref.index, negate=True)
            return None
        if isinstance(node, exp.Literal):
            return self._literal(node, LiteralKind.STRING if node.is_string else LiteralKind.NUMBER)
        if isinstance(node, exp.ByteString):  # sqlglot's name for E'...' in the postgres dialect
            return self._literal(node, LiteralKind.STRING)
        if isinstance(node, exp.RawString):  # $$...$$: part of the fingerprint, so a constant
            return ValueRef(RefKind.CONST, value=str(node.this))
        if isinstance(node, exp.Null):
            return ValueRef(RefKind.NULL)
        if isinstance(node, exp.Parameter):
            inner = node.this
            if isinstance(inner, exp.Literal) and not inner.is_string and str(inner.this).isdigit():
                return ValueRef(RefKind.PARAM, int(str(inner.this)))
        return None

    def _literal(self, node: exp.Expr, kind: LiteralKind) -> ValueRef | None:
        """Map a sqlglot literal to the fingerprint's literal at the same offset, checking that
        both scanners read the same constant there (if not, the value is treated as unknown)."""
        start = node.meta.get("start") if node.meta else None
        if start is None:
            return None
        found = self._literal_at.get(self._base + start)
        if found is None:
            return None
        index, literal = found
        if literal.kind != kind or literal.value.decode("utf-8", "surrogateescape") != str(node.this):
            self.mismatch = True
            return None
        return ValueRef(RefKind.LITERAL, index)


def unparen(node: exp.Expr) -> exp.Expr:
    while isinstance(node, exp.Paren):
        node = node.this
    return node


def as_array(ref: ValueRef) -> ValueRef:
    return ValueRef(ref.kind, ref.index, ref.value, ref.negate, ref.cast, array=True)
