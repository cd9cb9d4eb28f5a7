"""Lexer and parser for the subset of Go's text/template that ``--format`` users rely on.

The parser turns template text into a small tree of dataclasses that
:mod:`controller.templates` evaluates.  Positions are kept so errors read
like Go's: ``template: :1:8: unexpected "}" in operand``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from controller.errors import TemplateError

# --- nodes -------------------------------------------------------------------


@dataclass
class Node:
    pos: int


@dataclass
class Text(Node):
    text: str


@dataclass
class Field(Node):
    """``.A.B`` (receiver is dot), ``$x.A`` (receiver a variable) or ``(pipe).A``."""

    names: list[str]
    receiver: Node | None = None  # None means dot


@dataclass
class Dot(Node):
    pass


@dataclass
class Variable(Node):
    name: str  # "$", "$x"
    names: list[str] = field(default_factory=list)


@dataclass
class Literal(Node):
    value: Any


@dataclass
class Identifier(Node):
    name: str


@dataclass
class Command(Node):
    args: list[Node]


@dataclass
class Pipeline(Node):
    decl: list[str]
    commands: list[Command]
    assign: bool = False  # "=" rather than ":="


@dataclass
class Action(Node):
    pipe: Pipeline


@dataclass
class ListNode(Node):
    nodes: list[Node]


@dataclass
class Branch(Node):
    """``if``, ``with`` and ``range``."""

    kind: str
    pipe: Pipeline
    body: ListNode
    else_body: ListNode | None


@dataclass
class Control(Node):
    kind: str  # "break" or "continue"


# --- lexer -------------------------------------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<raw>`[^`]*`)
  | (?P<string>"(?:[^"\\\n]|\\.)*")
  | (?P<char>'(?:[^'\\\n]|\\.)+')
  | (?P<declare>:=)
  | (?P<assign>=)
  | (?P<number>[-+]?(?:0[xX][0-9a-fA-F_]+|(?:\d[\d_]*)?\.?\d[\d_]*(?:[eE][-+]?\d+)?))
  | (?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+)
  | (?P<dot>\.)
  | (?P<variable>\$[A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<pipe>\|)
  | (?P<lparen>\()
  | (?P<rparen>\)(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
  | (?P<comma>,)
    """,
    re.VERBOSE,
)

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "0": "\0", "a": "\a",
            "b": "\b", "f": "\f", "v": "\v"}


def _unquote(text: str, pos: str) -> str:
    out: list[str] = []
    i = 1
    while i < len(text) - 1:
        ch = text[i]
        if ch == "\\":
            nxt = text[i + 1]
            if nxt in _ESCAPES:
                out.append(_ESCAPES[nxt])
                i += 2
                continue
            if nxt in "xuU":
                width = {"x": 2, "u": 4, "U": 8}[nxt]
                out.append(chr(int(text[i + 2:i + 2 + width], 16)))
                i += 2 + width
                continue
            raise TemplateError(f"template: {pos}: invalid escape in quoted string: {text}")
        out.append(ch)
        i += 1
    return "".join(out)


@dataclass
class Token:
    kind: str
    value: str
    pos: int


def _location(source: str, offset: int) -> str:
    line = source.count("\n", 0, offset) + 1
    col = offset - (source.rfind("\n", 0, offset) + 1)
    return f":{line}:{col}"


class Parser:
    def __init__(self, source: str) -> None:
        self.source = source
        self.tokens: list[Token] = []
        self.i = 0

    def error(self, pos: int, message: str) -> TemplateError:
        return TemplateError(f"template: {_location(self.source, pos)}: {message}")

    # Split into text and actions, honouring trim markers and comments.
    def _segments(self) -> list[tuple[str, str, int]]:
        src = self.source
        out: list[tuple[str, str, int]] = []
        pos = 0
        trim_next = False
        while True:
            start = src.find("{{", pos)
            if start < 0:
                text = src[pos:]
                out.append(("text", text.lstrip() if trim_next else text, pos))
                return out
            text = src[pos:start]
            inner_start = start + 2
            trim_left = src.startswith("- ", inner_start) or src.startswith("-\t", inner_start) \
                or src.startswith("-\n", inner_start)
            if trim_left:
                text = text.rstrip()
                inner_start += 1
            if trim_next:
                text = text.lstrip()
            out.append(("text", text, pos))
            end, inner_end, trim_right = self._action_end(inner_start, start)
            body = src[inner_start:inner_end]
            stripped = body.strip()
            if stripped.startswith("/*"):
                if not stripped.endswith("*/"):
                    raise self.error(start, "unclosed comment")
            else:
                out.append(("action", body, inner_start))
            trim_next = trim_right
            pos = end

    def _action_end(self, inner_start: int, start: int) -> tuple[int, int, bool]:
        src = self.source
        i = inner_start
        while i < len(src):
            ch = src[i]
            if ch in "\"'`":
                close = src.find(ch, i + 1) if ch == "`" else self._quote_end(i, ch)
                if close < 0:
                    raise self.error(i, "unterminated quoted string")
                i = close + 1
                continue
            if src.startswith("/*", i):
                close = src.find("*/", i + 2)
                if close < 0:
                    raise self.error(i, "unclosed comment")
                i = close + 2
                continue
            if src.startswith(" -}}", i) or src.startswith("\t-}}", i) or src.startswith("\n-}}", i):
                return i + 4, i, True
            if src.startswith("}}", i):
                return i + 2, i, False
            i += 1
        raise self.error(start, "unclosed action")

    def _quote_end(self, i: int, quote: str) -> int:
        src = self.source
        j = i + 1
        while j < len(src):
            if src[j] == "\\":
                j += 2
                continue
            if src[j] == quote:
                return j
            if src[j] == "\n":
                return -1
            j += 1
        return -1

    def _lex(self, body: str, base: int) -> list[Token]:
        tokens: list[Token] = []
        pos = 0
        while pos < len(body):
            match = _TOKEN.match(body, pos)
            if match is None:
                raise self.error(base + pos, f"unexpected {body[pos]!r} in command")
            kind = match.lastgroup or ""
            if kind != "space":
                tokens.append(Token(kind, match.group(), base + pos))
            pos = match.end()
        return tokens

    # --- parsing -------------------------------------------------------------

    def parse(self) -> ListNode:
        items: list[tuple[str, Any, int]] = []
        for kind, value, pos in self._segments():
            if kind == "text":
                if value:
                    items.append(("text", value, pos))
            else:
                items.append(("action", self._lex(value, pos), pos))
        self.items = items
        self.k = 0
        body, stop = self._list(top=True)
        if stop is not None:
            raise self.error(stop[1], f"unexpected {{{{{stop[0]}}}}}")
        return body

    def _list(self, top: bool = False) -> tuple[ListNode, tuple[str, int, list[Token]] | None]:
        nodes: list[Node] = []
        start = self.items[self.k][2] if self.k < len(self.items) else 0
        while self.k < len(self.items):
            kind, value, pos = self.items[self.k]
            self.k += 1
            if kind == "text":
                nodes.append(Text(pos, value))
                continue
            tokens: list[Token] = value
            if not tokens:
                raise self.error(pos, "missing value for command")
            head = tokens[0]
            if head.kind == "ident" and head.value in ("end", "else"):
                return ListNode(start, nodes), (head.value, pos, tokens[1:])
            if head.kind == "ident" and head.value in ("if", "with", "range"):
                nodes.append(self._branch(head.value, tokens[1:], pos))
            elif head.kind == "ident" and head.value in ("break", "continue"):
                nodes.append(Control(pos, head.value))
            elif head.kind == "ident" and head.value in ("define", "template", "block"):
                raise self.error(pos, f"{{{{{head.value}}}}} is not supported")
            else:
                nodes.append(Action(pos, self._pipeline(tokens, pos)))
        if not top:
            raise self.error(len(self.source), "unexpected EOF")
        return ListNode(start, nodes), None

    def _branch(self, kind: str, tokens: list[Token], pos: int) -> Branch:
        if not tokens:
            raise self.error(pos, f"missing value for {kind}")
        pipe = self._pipeline(tokens, pos, allow_two_vars=(kind == "range"))
        body, stop = self._list()
        assert stop is not None
        else_body: ListNode | None = None
        if stop[0] == "else":
            rest = stop[2]
            if rest and rest[0].kind == "ident" and rest[0].value in ("if", "with"):
                # {{else if …}} / {{else with …}}: a nested branch that shares our {{end}}.
                nested = self._branch(rest[0].value, rest[1:], stop[1])
                else_body = ListNode(stop[1], [nested])
                return Branch(pos, kind, pipe, body, else_body)
            if rest:
                raise self.error(stop[1], "unexpected tokens after else")
            else_body, stop = self._list()
            assert stop is not None
            if stop[0] != "end":
                raise self.error(stop[1], "expected end; found {{else}}")
        elif stop[2]:
            raise self.error(stop[1], "unexpected tokens after end")
        return Branch(pos, kind, pipe, body, else_body)

    def _pipeline(self, tokens: list[Token], pos: int, allow_two_vars: bool = False) -> Pipeline:
        decl: list[str] = []
        assign = False
        i = 0
        # $x := …, $i, $v := …, $x = …
        probe = 0
        names: list[str] = []
        while probe < len(tokens) and tokens[probe].kind == "variable" and "." not in tokens[probe].value:
            names.append(tokens[probe].value)
            probe += 1
            if probe < len(tokens) and tokens[probe].kind == "comma" and allow_two_vars and len(names) == 1:
                probe += 1
                continue
            break
        if names and probe < len(tokens) and tokens[probe].kind in ("declare", "assign"):
            decl, assign, i = names, tokens[probe].kind == "assign", probe + 1
        commands: list[Command] = []
        current: list[Node] = []
        while i < len(tokens):
            tok = tokens[i]
            if tok.kind == "pipe":
                if not current:
                    raise self.error(tok.pos, "missing command before |")
                commands.append(Command(current[0].pos, current))
                current = []
                i += 1
                continue
            node, i = self._operand(tokens, i)
            current.append(node)
        if not current:
            raise self.error(pos, "missing value for command")
        commands.append(Command(current[0].pos, current))
        return Pipeline(pos, decl, commands, assign)

    def _operand(self, tokens: list[Token], i: int) -> tuple[Node, int]:
        tok = tokens[i]
        kind, value = tok.kind, tok.value
        if kind == "field":
            return Field(tok.pos, value[1:].split(".")), i + 1
        if kind == "dot":
            return Dot(tok.pos), i + 1
        if kind == "variable":
            name, *names = value.split(".")
            return Variable(tok.pos, name, names), i + 1
        if kind in ("string", "char"):
            text = _unquote(value, _location(self.source, tok.pos))
            return Literal(tok.pos, text if kind == "string" else (ord(text) if len(text) == 1 else text)), i + 1
        if kind == "raw":
            return Literal(tok.pos, value[1:-1]), i + 1
        if kind == "number":
            return Literal(tok.pos, _number(value, self.error(tok.pos, f"bad number syntax: {value!r}"))), i + 1
        if kind == "ident":
            if value in ("true", "false"):
                return Literal(tok.pos, value == "true"), i + 1
            if value == "nil":
                return Literal(tok.pos, None), i + 1
            return Identifier(tok.pos, value), i + 1
        if kind == "lparen":
            depth, j = 1, i + 1
            while j < len(tokens) and depth:
                if tokens[j].kind == "lparen":
                    depth += 1
                elif tokens[j].kind == "rparen":
                    depth -= 1
                j += 1
            if depth:
                raise self.error(tok.pos, "unclosed left paren")
            close = tokens[j - 1]
            inner = self._pipeline(tokens[i + 1:j - 1], tok.pos)
            chain = close.value[1:]
            if chain:
                return Field(tok.pos, chain[1:].split("."), receiver=inner), j
            return inner, j
        raise self.error(tok.pos, f"unexpected {value!r} in operand")


def _number(text: str, error: TemplateError) -> int | float:
    clean = text.replace("_", "")
    try:
        if clean.lower().lstrip("+-").startswith("0x"):
            return int(clean, 16)
        if re.fullmatch(r"[-+]?\d+", clean):
            return int(clean)
        return float(clean)
    except ValueError:
        raise error from None


def parse(source: str) -> ListNode:
    return Parser(source).parse()
