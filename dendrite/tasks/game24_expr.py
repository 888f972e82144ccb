"""Exact evaluation of an arithmetic answer such as ``(13-9)*(10-4)``, without ``eval``.

The Game of 24 verifier needs the expression's value as a ``Fraction`` and the integer literals
it uses. A tiny recursive-descent parser over ``+ - * /``, parentheses and non-negative
integer literals, with the usual precedence and left associativity::

    expr   := term (('+' | '-') term)*
    term   := factor (('*' | '/') factor)*
    factor := INT | '(' expr ')'

No unary minus, no decimals, no implicit multiplication: an answer must be a plain combination
of the puzzle's numbers. Any malformed input or a division by zero raises
:class:`~dendrite.errors.DendriteError`.
"""

from __future__ import annotations

import re
from fractions import Fraction

from dendrite.errors import DendriteError

_TOKEN_RE = re.compile(r"\s*(?:(\d+)|(.))")
MAX_LENGTH = 200  # answers are short; refuse pathological inputs early


def _tokens(text: str) -> list[str]:
    out = []
    for m in _TOKEN_RE.finditer(text):
        tok = m[1] or m[2]
        if tok is None:  # trailing whitespace
            continue
        if m[2] is not None and tok not in "+-*/()":
            raise DendriteError(f"unexpected character {tok!r} in expression {text!r}")
        out.append(tok)
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokens(text)
        self.pos = 0
        self.literals: list[int] = []

    def _peek(self) -> str | None:
        return self.toks[self.pos] if self.pos < len(self.toks) else None

    def _take(self) -> str:
        tok = self._peek()
        if tok is None:
            raise DendriteError(f"expression {self.text!r} ends too early")
        self.pos += 1
        return tok

    def expr(self) -> Fraction:
        value = self.term()
        while self._peek() in ("+", "-"):
            op = self._take()
            rhs = self.term()
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self) -> Fraction:
        value = self.factor()
        while self._peek() in ("*", "/"):
            op = self._take()
            rhs = self.factor()
            if op == "*":
                value = value * rhs
            elif rhs == 0:
                raise DendriteError(f"division by zero in {self.text!r}")
            else:
                value = value / rhs
        return value

    def factor(self) -> Fraction:
        tok = self._take()
        if tok == "(":
            value = self.expr()
            if self._take() != ")":
                raise DendriteError(f"missing ')' in {self.text!r}")
            return value
        if tok.isdigit():
            self.literals.append(int(tok))
            return Fraction(int(tok))
        raise DendriteError(f"unexpected {tok!r} in expression {self.text!r}")


def evaluate_expression(text: str) -> tuple[Fraction, list[int]]:
    """The exact value of ``text`` and the integer literals it uses, in order.

    >>> evaluate_expression("(13-9)*(10-4)")
    (Fraction(24, 1), [13, 9, 10, 4])
    """
    if len(text) > MAX_LENGTH:
        raise DendriteError(f"expression is longer than {MAX_LENGTH} characters")
    parser = _Parser(text)
    value = parser.expr()
    if parser._peek() is not None:
        raise DendriteError(f"unexpected {parser._peek()!r} after a complete expression")
    return value, parser.literals


__all__ = ["evaluate_expression"]
