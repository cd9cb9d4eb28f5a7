from typing import Any

import pytest

from controller.errors import TemplateError
from controller.templates import Template, format_rows, go_str, parse_table_format, render, sprintf, tabwrite

DOC: dict[str, Any] = {
    "Id": "sha256:abc",
    "ID": "abc123",
    "RepoTags": ["busybox:1", "local/x:2"],
    "Config": {"Env": ["PATH=/bin", "A=1"], "Cmd": ["sh"], "Labels": {"a.b": "x", "z": "y"}, "User": ""},
    "State": {"Running": True, "Pid": 42, "ExitCode": 0},
    "Size": 1234,
    "Empty": [],
    "Nil": None,
}


@pytest.mark.parametrize(("template", "expected"), [
    ("{{.Id}}", "sha256:abc"),
    ("{{.Config.Env}}", "[PATH=/bin A=1]"),
    ("{{.Config.Labels}}", "map[a.b:x z:y]"),
    ("{{json .Config.Cmd}}", '["sh"]'),
    ("{{json .Config.Labels}}", '{"a.b":"x","z":"y"}'),
    ("{{.Config | json}}", '{"Env":["PATH=/bin","A=1"],"Cmd":["sh"],"Labels":{"a.b":"x","z":"y"},"User":""}'),
    ("{{range .RepoTags}}{{.}} {{end}}", "busybox:1 local/x:2 "),
    ("{{range $i, $t := .RepoTags}}{{$i}}={{$t}};{{end}}", "0=busybox:1;1=local/x:2;"),
    ("{{range $k, $v := .Config.Labels}}{{$k}}:{{$v}},{{end}}", "a.b:x,z:y,"),
    ("{{range .Empty}}x{{else}}none{{end}}", "none"),
    ('{{index .Config.Labels "a.b"}}', "x"),
    ("{{index .RepoTags 1}}", "local/x:2"),
    ('{{(index .Config.Labels "z")}}', "y"),
    ("{{.State.Running}}", "true"),
    ("{{.Missing}}", "<no value>"),
    ("{{.Nil}}", "<nil>"),
    ('{{printf "%-8s|" .ID}}', "abc123  |"),
    ('{{printf "%5d|%q|%v|%t" .Size .ID .Config.Cmd true}}', " 1234|\"abc123\"|[sh]|true"),
    ("{{if .State.Running}}up{{else}}down{{end}}", "up"),
    ("{{if not .State.Running}}up{{else if .Size}}size{{else}}none{{end}}", "size"),
    ('{{if eq .State.ExitCode 0 1}}ok{{end}}', "ok"),
    ('{{if and .State.Running (gt .Size 1000)}}big{{end}}', "big"),
    ('{{or .Config.User "root"}}', "root"),
    ("{{with .Config}}{{.Cmd}}{{end}}", "[sh]"),
    ("{{with .Config.User}}{{.}}{{else}}-{{end}}", "-"),
    ("{{len .RepoTags}}", "2"),
    ('{{join .Config.Env ","}}', "PATH=/bin,A=1"),
    ('{{split "a:b" ":"}}', "[a b]"),
    ("{{upper .ID}} {{lower \"ABC\"}} {{title \"hello world\"}}", "ABC123 abc Hello World"),
    ("{{truncate .ID 3}}|{{pad .ID 1 2}}|", "abc| abc123  |"),
    ("a {{- /* comment */ -}} b", "ab"),
    ("{{$x := .ID}}{{$x}}{{$x = \"new\"}} {{$x}}", "abc123 new"),
    ("{{$.ID}}{{range .RepoTags}}{{$.Size}}{{end}}", "abc12312341234"),
    ("{{range .RepoTags}}{{if eq . \"busybox:1\"}}{{continue}}{{end}}{{.}}{{end}}", "local/x:2"),
    ("{{range .RepoTags}}{{.}}{{break}}{{end}}", "busybox:1"),
    ("{{print 1 2 \"a\" 3}}", "1 2a3"),
    ("{{println .ID}}", "abc123\n"),
    ("{{slice .ID 1 3}}", "bc"),
    ("{{`raw \\n`}}", "raw \\n"),
])
def test_render(template: str, expected: str) -> None:
    assert render(template, DOC) == expected


class Obj:
    Name = "n"


@pytest.mark.parametrize(("template", "message"), [
    ("{{.Id", "unclosed action"),
    ("{{end}}", "unexpected {{end}}"),
    ("{{if .Id}}x", "unexpected EOF"),
    ("{{nosuch .Id}}", 'function "nosuch" not defined'),
    ("{{.Id }}}", None),
    ("{{.Config.Env.X}}", "can't evaluate field X"),
    ("{{.Nil.X}}", "nil pointer"),
    ("{{$nope}}", "undefined variable"),
    ("{{index .RepoTags 9}}", "index out of range"),
    ("{{/* open", "unclosed comment"),
    ('{{"unterminated}}', "unterminated"),
])
def test_errors(template: str, message: str | None) -> None:
    if message is None:  # a stray brace after an action is just text
        assert render(template, DOC) == "sha256:abc}"
        return
    with pytest.raises(TemplateError) as info:
        render(template, DOC)
    assert message in str(info.value)
    assert str(info.value).startswith("template: ")


def test_objects_and_funcs() -> None:
    assert render("{{.Name}}", Obj()) == "n"
    with pytest.raises(TemplateError, match="can't evaluate field Other"):
        render("{{.Other}}", Obj())
    assert Template("{{double 2}}", {"double": lambda x: x * 2}).execute(None) == "4"


def test_go_values() -> None:
    assert go_str([1, [2, 3], {"b": 1, "a": None}]) == "[1 [2 3] map[a:<nil> b:1]]"
    assert go_str(1000000.0) == "1e+06" and go_str(2.5) == "2.5" and go_str(3.0) == "3"
    assert sprintf("%s %d%%", "a", 5) == "a 5%"
    assert sprintf("%s") == "%!s(MISSING)"


def test_tables() -> None:
    assert parse_table_format("table {{.A}}") == (True, "{{.A}}")
    assert parse_table_format("{{.A}}") == (False, "{{.A}}")
    rows = [{"Repository": "busybox", "Tag": "1", "ID": "abc"}, {"Repository": "a-much-longer-name", "Tag": "latest", "ID": "def"}]
    out = format_rows("table {{.Repository}}\\t{{.Tag}}\\t{{.ID}}", rows, {"ID": "IMAGE ID"})
    assert out.splitlines() == [
        "REPOSITORY           TAG       IMAGE ID",
        "busybox              1         abc",
        "a-much-longer-name   latest    def",
    ]
    assert format_rows("{{.Repository}}:{{.Tag}}", rows) == "busybox:1\na-much-longer-name:latest"
    assert format_rows("table {{.CreatedSince}}", [{"CreatedSince": "x"}]).splitlines()[0] == "CREATED SINCE"
    assert tabwrite(["a\tb", "ccc\td"]) == "a         b\nccc       d"
