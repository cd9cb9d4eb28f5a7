"""Go text/template semantics for ``--format``, shared by every skiff command.

Supported: fields (``{{.A.B}}``), variables, pipelines, ``if``/``else if``/
``with``/``range`` (with ``else``, ``break``, ``continue``), literals,
parentheses, trim markers, comments, Go's builtins (``and or not eq ne lt le
gt ge len index slice print printf println``) and docker's extra functions
(``json join split title lower upper pad truncate``).  Values print like Go's
``%v``: ``<nil>``, ``[a b]``, ``map[k:v]``, ``true``; a missing map key is
``<no value>``.
"""

from __future__ import annotations

import json
import math
from decimal import Decimal
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from controller.errors import TemplateError
from controller.template_parse import (
    Action,
    Branch,
    Command,
    Control,
    Dot,
    Field,
    Identifier,
    ListNode,
    Literal,
    Node,
    Pipeline,
    Text,
    Variable,
    parse,
)


class _NoValue:
    def __repr__(self) -> str:
        return "<no value>"


NO_VALUE = _NoValue()


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


# --- printing like Go's %v ------------------------------------------------------


def _go_float(value: float) -> str:
    """strconv.FormatFloat(v, 'g', -1, 64) as %v uses it: shortest digits, exponent from 1e6 or below 1e-4."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == 0:
        return "0"
    dec = Decimal(repr(abs(value)))
    digits = "".join(map(str, dec.as_tuple().digits)).rstrip("0") or "0"
    exponent = dec.adjusted()
    sign = "-" if value < 0 else ""
    if exponent < -4 or exponent >= 6:
        body = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return f"{sign}{body}e{'+' if exponent >= 0 else '-'}{abs(exponent):02d}"
    return sign + format(dec.normalize(), "f")


def go_str(value: Any) -> str:
    """Format ``value`` as Go's fmt ``%v`` would."""
    if value is NO_VALUE:
        return "<no value>"
    if value is None:
        return "<nil>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return _go_float(value)
    if isinstance(value, (str, int)):
        return str(value)
    if isinstance(value, Mapping):
        items = " ".join(f"{go_str(k)}:{go_str(value[k])}" for k in sorted(value, key=str))
        return f"map[{items}]"
    if isinstance(value, (list, tuple)):
        return "[" + " ".join(go_str(v) for v in value) + "]"
    return str(value)


def truthy(value: Any) -> bool:
    if value is NO_VALUE or value is None:
        return False
    if isinstance(value, (bool, int, float, str, list, tuple, dict)) or isinstance(value, Mapping):
        return bool(value)
    return True


# --- builtin and docker functions ----------------------------------------------


def _json(value: Any) -> str:
    return json.dumps(None if value is NO_VALUE else value, separators=(",", ":"), ensure_ascii=False, default=str)


def _index(item: Any, *keys: Any) -> Any:
    for key in keys:
        if isinstance(item, Mapping):
            item = item.get(key, NO_VALUE) if key in item else NO_VALUE
        elif isinstance(item, (list, tuple, str)):
            if not isinstance(key, int) or not 0 <= key < len(item):
                raise TemplateError(f"error calling index: index out of range: {key}")
            item = item[key]
        elif item is None or item is NO_VALUE:
            raise TemplateError("error calling index: index of untyped nil")
        else:
            raise TemplateError(f"error calling index: can't index item of type {type(item).__name__}")
    return item


def _slice(item: Any, *bounds: int) -> Any:
    if not isinstance(item, (list, tuple, str)):
        raise TemplateError(f"error calling slice: can't slice item of type {type(item).__name__}")
    return item[slice(*bounds)] if bounds else item


def _len(item: Any) -> int:
    try:
        return len(item)
    except TypeError:
        raise TemplateError(f"error calling len: len of type {type(item).__name__}") from None


def _compare(op: str) -> Callable[[Any, Any], bool]:
    def compare(a: Any, b: Any) -> bool:
        if isinstance(a, bool) or isinstance(b, bool) or type(a) is not type(b) and not (
                isinstance(a, (int, float)) and isinstance(b, (int, float))):
            raise TemplateError(f"error calling {op}: incompatible types for comparison")
        return {"lt": a < b, "le": a <= b, "gt": a > b, "ge": a >= b}[op]

    return compare


def _eq(a: Any, *others: Any) -> bool:
    if not others:
        raise TemplateError("error calling eq: missing argument for comparison")
    return any(a == b for b in others)


def _sprint(*args: Any) -> str:
    out = ""
    for i, arg in enumerate(args):
        if i and not isinstance(arg, str) and not isinstance(args[i - 1], str):
            out += " "
        out += go_str(arg)
    return out


_VERB = re.compile(r"%([-+# 0]*)(\d+|\*)?(?:\.(\d+))?([a-zA-Z%])")


def sprintf(fmt: str, *args: Any) -> str:
    """Go's fmt.Sprintf for the verbs templates use: %s %v %d %q %t %x %X %f %e %g %c %%."""
    out: list[str] = []
    pos = 0
    argi = 0
    for match in _VERB.finditer(fmt):
        out.append(fmt[pos:match.start()])
        pos = match.end()
        flags, width, prec, verb = match.groups()
        if verb == "%":
            out.append("%")
            continue
        if argi >= len(args):
            out.append(f"%!{verb}(MISSING)")
            continue
        arg = args[argi]
        argi += 1
        spec = flags.replace("#", "") + (width or "") + (f".{prec}" if prec else "")
        if verb in ("s", "v"):
            text = go_str(arg)
            out.append(format(text, ("<" if "-" in flags else ">") + (width or "") + (f".{prec}" if prec else "")))
        elif verb == "q":
            out.append(format(json.dumps(go_str(arg), ensure_ascii=False), ("<" if "-" in flags else ">") + (width or "")))
        elif verb == "t":
            out.append(format(go_str(arg), ("<" if "-" in flags else ">") + (width or "")))
        elif verb in ("d", "x", "X", "o", "b", "c") and isinstance(arg, (int, bool)):
            py = {"d": "d", "x": "x", "X": "X", "o": "o", "b": "b", "c": "c"}[verb]
            out.append(format(int(arg), spec.replace("-", "<") + py))
        elif verb in ("x", "X") and isinstance(arg, str):
            text = arg.encode().hex()
            out.append(text.upper() if verb == "X" else text)
        elif verb in ("f", "F", "e", "E", "g", "G") and isinstance(arg, (int, float)):
            out.append(format(float(arg), spec.replace("-", "<") + verb.lower() if verb != "F" else "f"))
        else:
            out.append(f"%!{verb}({type(arg).__name__}={go_str(arg)})")
    out.append(fmt[pos:])
    if argi < len(args):
        out.append("%!(EXTRA " + ", ".join(go_str(a) for a in args[argi:]) + ")")
    return "".join(out)


def _truncate(text: Any, length: int) -> str:
    s = go_str(text)
    return s[:length] if len(s) > length else s


def _pad(text: Any, left: int, right: int) -> str:
    return " " * left + go_str(text) + " " * right


def _title(text: Any) -> str:
    return re.sub(r"\b([a-z])", lambda m: m.group(1).upper(), go_str(text))


BUILTINS: dict[str, Callable[..., Any]] = {
    "not": lambda a: not truthy(a),
    "len": _len,
    "index": _index,
    "slice": _slice,
    "eq": _eq,
    "ne": lambda a, b: a != b,
    "lt": _compare("lt"),
    "le": _compare("le"),
    "gt": _compare("gt"),
    "ge": _compare("ge"),
    "print": _sprint,
    "printf": sprintf,
    "println": lambda *a: " ".join(go_str(x) for x in a) + "\n",
    "json": _json,
    "join": lambda items, sep: sep.join(go_str(i) for i in (items or [])),
    "split": lambda text, sep: go_str(text).split(sep),
    "title": _title,
    "lower": lambda text: go_str(text).lower(),
    "upper": lambda text: go_str(text).upper(),
    "pad": _pad,
    "truncate": _truncate,
}


# --- evaluation -------------------------------------------------------------------


class Template:
    """A parsed template; :meth:`execute` renders it against Python data."""

    def __init__(self, text: str, funcs: Mapping[str, Callable[..., Any]] | None = None) -> None:
        self.text = text
        self.funcs = {**BUILTINS, **(funcs or {})}
        self.root = parse(text)
        self._check_functions(self.root)

    def _check_functions(self, node: Node) -> None:
        if isinstance(node, ListNode):
            for child in node.nodes:
                self._check_functions(child)
        elif isinstance(node, Action):
            self._check_functions(node.pipe)
        elif isinstance(node, Branch):
            self._check_functions(node.pipe)
            self._check_functions(node.body)
            if node.else_body is not None:
                self._check_functions(node.else_body)
        elif isinstance(node, Pipeline):
            for command in node.commands:
                for arg in command.args:
                    self._check_functions(arg)
        elif isinstance(node, Identifier):
            if node.name not in self.funcs and node.name not in ("and", "or"):
                raise self._error(node, f'function "{node.name}" not defined')
        elif isinstance(node, Field) and isinstance(node.receiver, Pipeline):
            self._check_functions(node.receiver)

    def _error(self, node: Node, message: str) -> TemplateError:
        pos = node.pos
        line = self.text.count("\n", 0, pos) + 1
        col = pos - (self.text.rfind("\n", 0, pos) + 1)
        return TemplateError(f"template: :{line}:{col}: {message}")

    def execute(self, data: Any) -> str:
        out: list[str] = []
        scope: list[tuple[str, Any]] = [("$", data)]
        try:
            self._walk(self.root, data, scope, out)
        except (_Break, _Continue):
            raise TemplateError("template: {{break}} or {{continue}} outside {{range}}") from None
        return "".join(out)

    def _walk(self, node: ListNode, dot: Any, scope: list[tuple[str, Any]], out: list[str]) -> None:
        for child in node.nodes:
            if isinstance(child, Text):
                out.append(child.text)
            elif isinstance(child, Action):
                value = self._pipeline(child.pipe, dot, scope)
                if not child.pipe.decl:
                    out.append(go_str(value))
            elif isinstance(child, Branch):
                self._branch(child, dot, scope, out)
            elif isinstance(child, Control):
                raise _Break() if child.kind == "break" else _Continue()

    def _branch(self, node: Branch, dot: Any, scope: list[tuple[str, Any]], out: list[str]) -> None:
        mark = len(scope)
        try:
            if node.kind == "range":
                self._range(node, dot, scope, out)
                return
            value = self._pipeline(node.pipe, dot, scope)
            if truthy(value):
                self._walk(node.body, value if node.kind == "with" else dot, scope, out)
            elif node.else_body is not None:
                self._walk(node.else_body, dot, scope, out)
        finally:
            del scope[mark:]

    def _range(self, node: Branch, dot: Any, scope: list[tuple[str, Any]], out: list[str]) -> None:
        decl = node.pipe.decl
        pipe = Pipeline(node.pipe.pos, [], node.pipe.commands)
        value = self._pipeline(pipe, dot, scope)
        if isinstance(value, Mapping):
            pairs = [(k, value[k]) for k in sorted(value, key=str)]
        elif isinstance(value, (list, tuple, str)):
            pairs = list(enumerate(value))
        elif isinstance(value, int) and not isinstance(value, bool):
            pairs = [(i, i) for i in range(value)]
        elif value is None or value is NO_VALUE:
            pairs = []
        else:
            raise self._error(node, f"range can't iterate over {go_str(value)}")
        if not pairs:
            if node.else_body is not None:
                self._walk(node.else_body, dot, scope, out)
            return
        mark = len(scope)
        for key, item in pairs:
            del scope[mark:]
            if len(decl) == 1:
                scope.append((decl[0], item))
            elif len(decl) == 2:
                scope.extend([(decl[0], key), (decl[1], item)])
            try:
                self._walk(node.body, item, scope, out)
            except _Break:
                break
            except _Continue:
                continue

    def _pipeline(self, pipe: Pipeline, dot: Any, scope: list[tuple[str, Any]]) -> Any:
        value: Any = NO_VALUE
        first = True
        for command in pipe.commands:
            value = self._command(command, dot, scope, None if first else (value,))
            first = False
        if pipe.decl:
            if pipe.assign:
                for i in range(len(scope) - 1, -1, -1):
                    if scope[i][0] == pipe.decl[0]:
                        scope[i] = (pipe.decl[0], value)
                        break
                else:
                    raise self._error(pipe, f"undefined variable: {pipe.decl[0]}")
            else:
                scope.append((pipe.decl[0], value))
        return value

    def _command(self, command: Command, dot: Any, scope: list[tuple[str, Any]],
                 piped: tuple[Any] | None) -> Any:
        head = command.args[0]
        if isinstance(head, Identifier):
            return self._call(head, command.args[1:], dot, scope, piped)
        if len(command.args) > 1 or piped is not None:
            raise self._error(head, f"can't give argument to non-function {self._describe(head)}")
        return self._operand(head, dot, scope)

    @staticmethod
    def _describe(node: Node) -> str:
        if isinstance(node, Field):
            return "." + ".".join(node.names)
        if isinstance(node, Literal):
            return go_str(node.value)
        return type(node).__name__.lower()

    def _call(self, head: Identifier, arg_nodes: list[Node], dot: Any, scope: list[tuple[str, Any]],
              piped: tuple[Any] | None) -> Any:
        if head.name in ("and", "or"):
            nodes = list(arg_nodes)
            values: list[Callable[[], Any]] = [
                lambda n=n: self._operand(n, dot, scope) for n in nodes]  # type: ignore[misc]
            if piped is not None:
                values.append(lambda: piped[0])
            if not values:
                raise self._error(head, f"wrong number of args for {head.name}: want at least 1 got 0")
            result: Any = None
            for get in values:
                result = get()
                if truthy(result) != (head.name == "and"):
                    return result
            return result
        args = [self._operand(n, dot, scope) for n in arg_nodes]
        if piped is not None:
            args.append(piped[0])
        try:
            return self.funcs[head.name](*args)
        except TemplateError as exc:
            raise self._error(head, f'executing "" at <{head.name}>: {str(exc).removeprefix("template: ")}') from exc
        except TypeError as exc:
            raise self._error(head, f"wrong number of args for {head.name}: {exc}") from exc
        except (ValueError, AttributeError, KeyError) as exc:
            raise self._error(head, f"error calling {head.name}: {exc}") from exc

    def _operand(self, node: Node, dot: Any, scope: list[tuple[str, Any]]) -> Any:
        if isinstance(node, Literal):
            return node.value
        if isinstance(node, Dot):
            return dot
        if isinstance(node, Variable):
            for name, value in reversed(scope):
                if name == node.name:
                    return self._fields(node, value, node.names)
            raise self._error(node, f"undefined variable: {node.name}")
        if isinstance(node, Field):
            if node.receiver is None:
                return self._fields(node, dot, node.names)
            base = self._pipeline(node.receiver, dot, scope) if isinstance(node.receiver, Pipeline) \
                else self._operand(node.receiver, dot, scope)
            return self._fields(node, base, node.names)
        if isinstance(node, Pipeline):
            return self._pipeline(node, dot, scope)
        if isinstance(node, Identifier):
            return self._call(node, [], dot, scope, None)
        raise self._error(node, "unexpected node")

    def _fields(self, node: Node, value: Any, names: Sequence[str]) -> Any:
        for i, name in enumerate(names):
            if isinstance(value, Mapping):
                value = value[name] if name in value else NO_VALUE
            elif value is None or value is NO_VALUE:
                chain = "." + ".".join(names[: i + 1])
                raise self._error(node, f'executing "" at <{chain}>: nil pointer evaluating interface {{}}.{name}')
            elif hasattr(value, name) and not name.startswith("_"):
                value = getattr(value, name)
            else:
                chain = "." + ".".join(names[: i + 1])
                raise self._error(node, f'executing "" at <{chain}>: can\'t evaluate field {name} in type '
                                        f"{type(value).__name__}")
        return value


def render(text: str, data: Any) -> str:
    return Template(text).execute(data)


# --- docker's table output ----------------------------------------------------------


def parse_table_format(text: str) -> tuple[bool, str]:
    """docker's ``table`` prefix: ``"table {{.ID}}"`` → ``(True, "{{.ID}}")``."""
    if text == "table":
        return True, ""
    if text.startswith("table ") or text.startswith("table\t"):
        return True, text[6:]
    return False, text


def _header_name(field: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", field).upper()


class _Headers(dict):  # type: ignore[type-arg]
    """Data for rendering the header row: every field is its own column title."""

    def __init__(self, names: Mapping[str, str]) -> None:
        super().__init__()
        self.names = names

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str)

    def __getitem__(self, key: str) -> str:
        return self.names.get(key, _header_name(key))


def format_rows(text: str, rows: Sequence[Any], header_names: Mapping[str, str] | None = None) -> str:
    """Render list output: each row through the template; with ``table``, a header and aligned columns."""
    is_table, body = parse_table_format(text)
    template = Template(body.strip(" ").replace("\\t", "\t").replace("\\n", "\n"))
    lines = [template.execute(row) for row in rows]
    if not is_table:
        return "\n".join(lines)
    header = template.execute(_Headers(header_names or {}))
    return tabwrite([header, *lines])


def tabwrite(lines: Sequence[str], minwidth: int = 10, padding: int = 3) -> str:
    """Align tab-separated cells into columns like Go's tabwriter (as docker configures it)."""
    split = [line.split("\t") for line in lines]
    widths: dict[int, int] = {}
    for cells in split:
        for j, cell in enumerate(cells[:-1]):
            widths[j] = max(widths.get(j, minwidth), len(cell) + padding)
    out = []
    for cells in split:
        parts = [cell.ljust(widths[j]) for j, cell in enumerate(cells[:-1])]
        parts.append(cells[-1])
        out.append("".join(parts).rstrip() if not cells[-1] else "".join(parts))
    return "\n".join(out)
