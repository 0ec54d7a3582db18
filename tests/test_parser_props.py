"""Hostile job files: property tests of the parser and the sources, and the classic attacks
(huge lines, deep nesting, bad encodings, YAML bombs and object-constructing tags)."""

from __future__ import annotations

import re
import tracemalloc
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from fetcher.errors import JobFileError
from fetcher.jobs import HttpJob, InvalidJob, JobParser, MailJob, check_url
from fetcher.sources import MAX_LINE_BYTES, JobSource
from fetcher.yamlload import MAX_YAML_ALIASES, MAX_YAML_NODES

from .security_peers import run_cli

FAST = hsettings(
    max_examples=120,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
ENV = {"TOKEN": "t0k3n", "EMPTY": ""}
CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

FIELDS = [
    "id", "kind", "url", "method", "headers", "params", "json", "data", "timeout", "retries",
    "max_bytes", "allow_redirects", "body", "retry_unsafe", "meta", "smtp", "from", "to", "cc",
    "bcc", "subject", "text", "html",
]  # fmt: skip

nasty_text = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        [
            "http://127.0.0.1/", "https://u:p@h/", "GET", "POST\n", "GET\r\nX: y", "X-A\n",
            "${TOKEN}", "${MISSING}", "$${TOKEN}", "a\x00b", "\ufeffhttp://h/", "http://h/\x7f",
            "mail", "http", "a@b.c", "x@y\r\nBcc: z@w", "", "none", "text", "json", "base64",
            "http://[::1/", "http://h:99999/", "ftp://h/", "http:///x", "http://h/\u2028",
        ]
    ),
)  # fmt: skip
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    nasty_text,
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(nasty_text, inner, max_size=4),
    max_leaves=12,
)
job_like = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=8)


def check_item(item: Any, line: int) -> None:
    """What every parsed item must satisfy, valid or not."""
    assert isinstance(item, HttpJob | MailJob | InvalidJob), item
    if isinstance(item, InvalidJob):
        assert item.type in ("invalid_job", "invalid_url")
        assert item.line == line
        assert "\n" not in item.message and "\r" not in item.message
        orjson.dumps(item.to_result())
        return
    assert isinstance(item.id, str)
    orjson.dumps(item.meta)  # the result line can always be written
    for name, value in item.headers.items():
        assert not CONTROL.search(name) and not CONTROL.search(value), (name, value)
    if isinstance(item, HttpJob):
        assert re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9A-Z]+", item.method), item.method
        assert check_url(item.url)[0] is not None
        assert item.target.scheme in ("http", "https")
        orjson.dumps(item.json_body)
    else:
        for addr in [item.sender, *item.to, *item.cc, *item.bcc, item.subject]:
            assert "\r" not in addr and "\n" not in addr and "\x00" not in addr


@FAST
@given(obj=st.one_of(json_values, job_like))
def test_parse_any_json_value(obj: Any) -> None:
    check_item(JobParser(environ=ENV).parse(obj, 7), 7)


@FAST
@given(
    base=st.fixed_dictionaries(
        {"url": st.sampled_from(["http://127.0.0.1:9/", "https://u:${TOKEN}@h.test/x"])},
        optional={
            "method": nasty_text,
            "headers": st.dictionaries(nasty_text, nasty_text, max_size=3),
            "params": st.dictionaries(nasty_text, json_scalars, max_size=3),
            "meta": json_values,
            "json": json_values,
            "timeout": json_scalars,
            "retries": json_scalars,
            "body": nasty_text,
        },
    )
)
def test_parse_http_job_shapes(base: dict[str, Any]) -> None:
    check_item(JobParser(environ=ENV).parse(base, 1), 1)


@FAST
@given(lines=st.lists(st.binary(max_size=200), min_size=1, max_size=8))
def test_any_bytes_lines_give_one_item_each(tmp_path: Path, lines: list[bytes]) -> None:
    data = b"\n".join(line.replace(b"\n", b" ") for line in lines) + b"\n"
    path = tmp_path / "jobs.jsonl"
    path.write_bytes(data)
    items = list(JobSource(str(path), JobParser(environ=ENV)))
    split = data.split(b"\n")[:-1]
    split[0] = split[0].removeprefix(b"\xef\xbb\xbf")  # a BOM opening the file is not a job
    expected = [i for i, line in enumerate(split, 1) if line.strip()]
    assert [it.line for it in items] == expected
    for item in items:
        check_item(item, item.line)


@hsettings(FAST, max_examples=40)
@given(jobs=st.lists(job_like, max_size=5))
def test_any_yaml_job_list(tmp_path: Path, jobs: list[dict[str, Any]]) -> None:
    import yaml

    path = tmp_path / "jobs.yaml"
    path.write_text(yaml.safe_dump(jobs))
    items = list(JobSource(str(path), JobParser(environ=ENV)))
    assert [it.line for it in items] == list(range(1, len(jobs) + 1))
    for item in items:
        check_item(item, item.line)


def source_items(tmp_path: Path, name: str, data: bytes) -> list[Any]:
    path = tmp_path / name
    path.write_bytes(data)
    return list(JobSource(str(path), JobParser(environ=ENV)))


def test_ten_megabyte_line_is_refused_in_bounded_memory(tmp_path: Path) -> None:
    big = b'{"url": "http://h.test/", "meta": "' + b"x" * (10 * 1024 * 1024) + b'"}\n'
    path = tmp_path / "big.jsonl"
    path.write_bytes(b'{"url": "http://a.test/"}\n' + big + b'{"url": "http://b.test/"}\n')
    tracemalloc.start()
    try:
        items = list(JobSource(str(path), JobParser()))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [type(i) for i in items] == [HttpJob, InvalidJob, HttpJob]
    assert items[1].line == 2 and "longer than" in items[1].message
    assert peak < 3 * MAX_LINE_BYTES, peak


@pytest.mark.parametrize("depth", [50, 200, 300, 1000, 1023, 5000, 100_000])
@pytest.mark.parametrize("field", ["meta", "json", "headers"])
def test_deeply_nested_json(tmp_path: Path, depth: int, field: str) -> None:
    nested = "[" * depth + '"${TOKEN}"' + "]" * depth
    line = f'{{"url": "http://h.test/", "{field}": {nested}}}\n'.encode()
    (item,) = source_items(tmp_path, "deep.jsonl", line)
    check_item(item, 1)
    if depth > 100:
        assert isinstance(item, InvalidJob)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"url": "http://h.test/\xff"}',
        b"\xff\xfe{\x00}\x00",
        b'{"url": "http://h.test/", "id": "\xed\xa0\x80"}',  # a lone surrogate in UTF-8
        b'{"url": "http://h.test/", "meta": "\\ud800"}',  # an escaped lone surrogate
        b'{"url": "http://h.test/", "meta": 123456789012345678901234567890}',
        b'{"url": "http://h.test/", "meta": 1e400}',
        b'{"url": "http://h.test/", "url": "http://other.test/"}',
        b'{"url": "http://h.test/"} {"url": "http://x/"}',
        b"[]",
        b"null",
        b'"just a string"',
    ],
)
def test_odd_bytes_lines(tmp_path: Path, raw: bytes) -> None:
    items = source_items(tmp_path, "odd.jsonl", raw + b"\n")
    assert len(items) == 1
    check_item(items[0], 1)


def test_bom_is_ignored_on_the_first_line_only(tmp_path: Path) -> None:
    items = source_items(
        tmp_path,
        "bom.jsonl",
        b'\xef\xbb\xbf{"url": "http://h.test/"}\n\xef\xbb\xbf{"url": "http://h.test/"}\n',
    )
    assert isinstance(items[0], HttpJob)
    assert isinstance(items[1], InvalidJob)
    yaml_items = source_items(tmp_path, "bom.yaml", b"\xef\xbb\xbf- url: http://h.test/\n")
    assert isinstance(yaml_items[0], HttpJob)


BILLION_LAUGHS = b"""\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def indent(doc: bytes) -> bytes:
    return b"".join(b"    " + line + b"\n" for line in doc.splitlines())


LAUGHS_ENV = BILLION_LAUGHS.replace(b'"lol"', b'"${TOKEN}"')


@pytest.mark.parametrize(
    "doc",
    [
        # As a job's meta: a few hundred bytes that stand for a billion strings.
        b"- url: http://h.test/\n  meta:\n" + indent(BILLION_LAUGHS),
        # Under defaults, merged into every job.
        b"defaults:\n  meta:\n" + indent(BILLION_LAUGHS) + b"jobs:\n  - url: http://h.test/\n",
        # In headers, where ${...} expansion walks every string.
        b"- url: http://h.test/\n  json:\n" + indent(LAUGHS_ENV),
    ],
    ids=["meta", "defaults", "expanded"],
)  # fmt: skip
def test_yaml_billion_laughs_is_refused_fast(tmp_path: Path, doc: bytes) -> None:
    path = tmp_path / "laughs.yaml"
    path.write_bytes(doc)
    try:
        items = list(JobSource(str(path), JobParser(environ=ENV)))
    except JobFileError as exc:
        assert "\n" not in str(exc)
        return
    assert all(isinstance(i, InvalidJob) for i in items), items
    for item in items:
        check_item(item, item.line)


@pytest.mark.parametrize(
    "doc",
    [
        b"- &a [*a]\n",
        b"- url: http://h.test/\n  meta: &m {x: *m}\n",
        b"- &j {url: 'http://h.test/', meta: *j}\n",
    ],
)
def test_yaml_recursive_aliases(tmp_path: Path, doc: bytes) -> None:
    path = tmp_path / "loop.yaml"
    path.write_bytes(doc)
    try:
        items = list(JobSource(str(path), JobParser(environ=ENV)))
    except JobFileError as exc:
        assert "\n" not in str(exc)
        return
    for item in items:
        assert isinstance(item, InvalidJob)
        check_item(item, item.line)


#  The same bomb as a YAML sequence: 72 aliases that stand for 9**9 strings.
LAUGHS_LIST = (
    b"  - &a ["
    + b",".join([b'"lol"'] * 9)
    + b"]\n"
    + b"".join(
        b"  - &" + bytes([c]) + b" [" + b",".join([b"*" + bytes([c - 1])] * 9) + b"]\n"
        for c in b"bcdefghi"
    )
)


def _yaml_problem(tmp_path: Path, doc: bytes) -> str:
    path = tmp_path / "jobs.yaml"
    path.write_bytes(doc)
    with pytest.raises(JobFileError) as caught:
        list(JobSource(str(path), JobParser(environ=ENV)))
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "doc",
    [
        # A list entry that is not a job: the parser refuses it without a look inside.
        b"- url: http://h.test/\n-\n" + LAUGHS_LIST,
        # Under a top-level key that is not `jobs` or `defaults`: the file shape is refused
        # without walking the values.
        b"laughs:\n" + indent(BILLION_LAUGHS) + b"jobs:\n  - url: http://h.test/\n",
        # In defaults: each merged job would be refused by its own size check, one by one.
        b"defaults:\n  meta:\n" + indent(BILLION_LAUGHS) + b"jobs:\n  - url: http://h.test/\n",
    ],
    ids=["not-a-job", "other-key", "defaults"],
)
def test_yaml_expansion_cap_is_the_loaders(tmp_path: Path, doc: bytes) -> None:
    # Few aliases (under MAX_YAML_ALIASES), so only the loader's expansion count can stop these;
    # no later check would turn them into a JobFileError naming the expansion.
    assert doc.count(b"*") < MAX_YAML_ALIASES
    message = _yaml_problem(tmp_path, doc)
    assert f"not valid YAML: more than {MAX_YAML_NODES} values once aliases" in message


def test_yaml_alias_count_cap_is_the_loaders(tmp_path: Path) -> None:
    # Aliases of one short string expand to little: only the alias count refuses them.
    def doc(n: int) -> bytes:
        return b"- &s x\n- [" + b", ".join([b"*s"] * n) + b"]\n"

    path = tmp_path / "ok.yaml"
    path.write_bytes(doc(MAX_YAML_ALIASES))
    items = list(JobSource(str(path), JobParser()))
    assert [type(i) for i in items] == [InvalidJob, InvalidJob]  # not jobs, but loaded
    message = _yaml_problem(tmp_path, doc(MAX_YAML_ALIASES + 1))
    assert f"line 2: not valid YAML: more than {MAX_YAML_ALIASES} aliases" in message


def test_yaml_self_reference_is_the_loaders(tmp_path: Path) -> None:
    # A list that contains itself, in an entry the parser refuses without a look inside.
    message = _yaml_problem(tmp_path, b"- url: http://h.test/\n- &a [x, *a]\n")
    assert "not valid YAML: an alias refers to a node that contains it" in message


@pytest.mark.parametrize(
    "doc",
    [
        b"- !!python/object/apply:os.system ['touch /tmp/fetcher-pwned']\n",
        b"- url: http://h.test/\n  meta: !!python/object:collections.OrderedDict {}\n",
        b"- url: !!python/name:os.system\n",
        b"- !!python/object/new:type [x, [], {}]\n",
    ],
)
def test_yaml_object_tags_are_refused(tmp_path: Path, doc: bytes) -> None:
    path = tmp_path / "tags.yaml"
    path.write_bytes(doc)
    with pytest.raises(JobFileError) as caught:
        list(JobSource(str(path), JobParser()))
    assert "\n" not in str(caught.value)
    assert not Path("/tmp/fetcher-pwned").exists()


@pytest.mark.parametrize(
    "doc",
    [
        b"- url: http://h.test/\n  meta: !!binary aGVsbG8=\n",
        b"- url: http://h.test/\n  meta: !!set {a, b}\n",
        b"- url: http://h.test/\n  meta: {1: x, null: y, [a]: z}\n",
        b"- url: http://h.test/\n  meta: 2024-01-01\n",
        b"- url: http://h.test/\n  meta: 123456789012345678901234567890\n",
        b"- url: http://h.test/\n  json: {? [a, b] : c}\n",
        b"- url: http://h.test/\n  meta: .nan\n",
        b"- url: http://h.test/\n  headers: {X-A: !!binary aGVsbG8=}\n",
        b"- url: http://h.test/\n  id: 12\n",
    ],
)
def test_yaml_values_json_cannot_hold(tmp_path: Path, doc: bytes) -> None:
    try:
        items = source_items(tmp_path, "odd.yaml", doc)
    except JobFileError as exc:  # e.g. a list as a mapping key: the YAML loader refuses it
        assert "\n" not in str(exc)
        return
    assert len(items) == 1
    check_item(items[0], 1)


@pytest.mark.parametrize("depth", [100, 3000])
def test_yaml_deep_nesting(tmp_path: Path, depth: int) -> None:
    doc = b"- url: http://h.test/\n  meta: " + b"[" * depth + b"]" * depth + b"\n"
    path = tmp_path / "deep.yaml"
    path.write_bytes(doc)
    try:
        items = list(JobSource(str(path), JobParser()))
    except JobFileError as exc:
        assert "\n" not in str(exc)
        return
    (item,) = items
    check_item(item, 1)
    assert isinstance(item, InvalidJob)


def test_yaml_not_utf8_is_a_job_file_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"- url: http://h.test/\xff\xfe\n")
    with pytest.raises(JobFileError) as caught:
        list(JobSource(str(path), JobParser()))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "doc",
    [
        b"- !!python/object/apply:os.system ['true']\n",
        b"- url: http://h.test/\n  meta:\n" + BILLION_LAUGHS.replace(b"\n", b"\n    "),
    ],
    ids=["python-tag", "laughs"],
)
async def test_unparseable_yaml_is_one_line_and_exit_2(tmp_path: Path, doc: bytes) -> None:
    path = tmp_path / "jobs.yaml"
    path.write_bytes(doc)
    run = await run_cli("run", str(path), "-o", str(tmp_path / "out.jsonl"))
    assert run.code == 2, run
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert b"Traceback" not in run.stderr
    assert not (tmp_path / "out.jsonl").exists() or (tmp_path / "out.jsonl").stat().st_size == 0


async def test_hostile_jsonl_run_has_one_result_per_line(tmp_path: Path) -> None:
    lines = [
        b"\xef\xbb\xbf{broken",
        b"\xff\xfe",
        b"[" * 5000,
        b'{"url": "http://h.invalid/", "method": "GET\\r\\nX: y"}',
        b'{"url": "http://h.invalid/", "meta": ' + b"[" * 400 + b"]" * 400 + b"}",
        b'{"url": "http://h.invalid/", "meta": 1e999}',
        b'{"url": "http://h.invalid/", "headers": {"X": "a\\u0001b"}}',
        b'"x" * 2',
    ]
    path = tmp_path / "jobs.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    run = await run_cli("run", str(path), "--retries", "0")
    assert run.code == 1, run
    results = run.results
    assert sorted(r["line"] for r in results if "line" in r) == sorted(
        r["line"] for r in results if r["error"]["type"] in ("invalid_job", "invalid_url")
    )
    assert len(results) == len(lines)
    assert b"Traceback" not in run.stderr


@pytest.mark.parametrize(
    "job",
    [
        {"url": "http://h.test/", "params": {"\n": None}},
        {"url": "http://h.test/", "headers": {"a\r\nb": 1}},
        {"url": "http://h.test/", "meta": {"\x00": 1}, "x\ny": 1},
    ],
)
def test_messages_stay_on_one_line(job: dict[str, Any]) -> None:
    """Field names come from the job file: they must not break the one-line message."""
    item = JobParser(environ=ENV).parse(job, 3)
    assert isinstance(item, InvalidJob)
    check_item(item, 3)


_PATH_CHARS = "abcXYZ019-._~!$&'()*+,;=:@%"
_SEGMENTS = st.lists(
    st.one_of(st.sampled_from(["", ".", "..", "%41", "%7e", "a b", "é"]), st.text(_PATH_CHARS)),
    max_size=5,
).map("/".join)
_HOSTS = st.sampled_from(
    [
        "example.test",
        "Example.TEST",
        "127.0.0.1",
        "a-b.c0.test",
        "x",
        "host.",
        "1.2.3.4.5",
        "0",
        "-a.test",
    ]
)


@FAST
@given(
    scheme=st.sampled_from(["http", "https"]),
    host=_HOSTS,
    port=st.one_of(
        st.none(), st.integers(0, 99_999).map(str), st.sampled_from(["0", "00", "080", "08080"])
    ),
    path=_SEGMENTS,
    query=st.one_of(st.none(), st.text(_PATH_CHARS + "/?", max_size=20)),
)
def test_a_url_taken_as_encoded_is_the_url_yarl_would_have_built(
    scheme: str, host: str, port: str | None, path: str, query: str | None
) -> None:
    """check_url skips yarl's encoding for URLs already in canonical form: for every URL it
    so takes, the result must be the one the full parse gives (or the same refusal)."""
    from yarl import URL

    url = f"{scheme}://{host}{'' if port is None else f':{port}'}/{path}"
    if query is not None:
        url += f"?{query}"
    got, reason = check_url(url)
    try:
        full: URL | None = URL(url)
        full.port  # type: ignore[union-attr]  # noqa: B018 - a bad port raises only when read
    except ValueError:
        full = None
    if got is None:  # refused: by yarl too, or for a space (which yarl would quote)
        assert full is None or reason == "URL contains control characters or spaces", url
        return
    assert full is not None, url
    for attr in ("scheme", "host", "port", "raw_path", "path", "raw_query_string", "fragment"):
        assert getattr(got, attr) == getattr(full, attr), (url, attr)
    assert str(got) == str(full), url
    assert got.query == full.query, url
