"""Axis specifications: the einops-style strings that name a normalization mode.

A spec reads ``"<input axes> -> <statistics axes>"``. Input axes are names, one ``...``
(any number of axes) and parenthesised groups that split one input axis into several
named ones, e.g. ``"n (g k) ... -> n g"``. The right-hand side names the axes the
statistics are kept on; every other input axis is reduced. Parameter and running-statistic
axes are written the same way (see :func:`parse_axes`).

Parsing is pure and cached: the 4096 most recent spec strings are kept parsed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["SpecError", "ParsedSpec", "parse_spec", "parse_axes", "ELLIPSIS"]

ELLIPSIS = "..."
_TOKEN = re.compile(r"\s*(\(|\)|\.\.\.|[A-Za-z_][A-Za-z0-9_]*|\S)")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class SpecError(ValueError):
    """A malformed axis specification. The message names the spec and the offending token."""


@dataclass(frozen=True)
class ParsedSpec:
    text: str
    # Input axes in order; each entry is a tuple of elementary names: ("c",), ("g", "k")
    # for a parenthesised group, or ("...",) for the ellipsis.
    lhs: tuple[tuple[str, ...], ...]
    # Elementary names kept by the statistics ("..." included when the ellipsis is kept),
    # in input order.
    kept: tuple[str, ...]

    @property
    def names(self) -> tuple[str, ...]:
        """Every elementary name on the left, in order ("..." included)."""
        return tuple(n for group in self.lhs for n in group)


def _tokens(text: str, spec: str) -> list[str]:
    out = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:  # only trailing whitespace is left
            break
        tok = m.group(1)
        if tok not in ("(", ")", ELLIPSIS) and not _NAME.match(tok):
            raise SpecError(f"spec {spec!r}: invalid token {tok!r}; axes are names, '...' or '( )'")
        out.append(tok)
        pos = m.end()
    return out


def _groups(text: str, spec: str, *, allow_parens: bool) -> tuple[tuple[str, ...], ...]:
    groups: list[tuple[str, ...]] = []
    current: list[str] | None = None
    seen: set[str] = set()
    for tok in _tokens(text, spec):
        if tok == "(":
            if not allow_parens:
                raise SpecError(f"spec {spec!r}: parentheses are not allowed in {text.strip()!r}")
            if current is not None:
                raise SpecError(f"spec {spec!r}: nested parenthesis '(' inside a group")
            current = []
            continue
        if tok == ")":
            if current is None:
                raise SpecError(f"spec {spec!r}: unbalanced parenthesis ')'")
            if not current:
                raise SpecError(f"spec {spec!r}: empty group '()'")
            groups.append(tuple(current))
            current = None
            continue
        if tok in seen:
            what = "two '...'" if tok == ELLIPSIS else f"duplicate axis {tok!r}"
            raise SpecError(f"spec {spec!r}: {what}")
        seen.add(tok)
        if current is not None:
            if tok == ELLIPSIS:
                raise SpecError(f"spec {spec!r}: '...' inside parentheses")
            current.append(tok)
        else:
            groups.append((tok,))
    if current is not None:
        raise SpecError(f"spec {spec!r}: unbalanced parenthesis '('")
    return tuple(groups)


@lru_cache(maxsize=4096)
def parse_spec(spec: str) -> ParsedSpec:
    """Parse ``"lhs -> rhs"`` into a :class:`ParsedSpec`.

    >>> parse_spec("n (g k) ... -> n g").kept
    ('n', 'g')
    """
    if not isinstance(spec, str):
        raise TypeError(f"spec: expected a str, got {type(spec).__name__}")
    if spec.count("->") != 1:
        raise SpecError(f"spec {spec!r}: expected exactly one '->' between input and statistics axes")
    left, right = spec.split("->")
    lhs = _groups(left, spec, allow_parens=True)
    if not lhs:
        raise SpecError(f"spec {spec!r}: no input axes on the left of '->'")
    rhs = _groups(right, spec, allow_parens=False)
    kept = tuple(g[0] for g in rhs)
    _ordered_subset(kept, tuple(n for g in lhs for n in g), spec, "statistics",
                    "axis {!r} on the right is missing on the left")
    return ParsedSpec(spec, lhs, kept)


def _ordered_subset(names, allowed, spec, what, missing):
    """Check that ``names`` are among ``allowed`` and in the same order."""
    for name in names:
        if name not in allowed:
            raise SpecError(f"spec {spec!r}: " + missing.format(name))
    order = [allowed.index(n) for n in names]
    if order != sorted(order):
        raise SpecError(f"spec {spec!r}: {what} axes {' '.join(names)!r} must keep their left-hand order")


@lru_cache(maxsize=4096)
def parse_axes(text: str, spec: str, what: str, allowed: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    """Parse an axis list such as ``"c"``, ``"(g k)"`` or ``"d0 d1"`` against a spec.

    Each returned entry is one axis of the array it describes (a parenthesised group
    merges its elementary axes into one). Names must be among ``allowed`` and appear in
    the spec's left-hand order.
    """
    groups = _groups(text, spec, allow_parens=True)
    _ordered_subset(tuple(n for g in groups for n in g), allowed, spec, what,
                    f"{what} axis {{!r}} is not one of {' '.join(allowed)!r}")
    return groups
