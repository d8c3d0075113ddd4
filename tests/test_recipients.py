"""Recipient extraction from header fields (sendmail -t rules, RFC 5322 address lists)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgate.model import Address
from mailgate.recipients import (
    MAX_ITEM_LENGTH,
    RecipientError,
    TooManyRecipients,
    extract_recipients,
    parse_address_list,
    recipient_values,
    split_address_list,
)

D = "example.com"


def addrs(*texts: str) -> list[Address]:
    return [Address.parse(t) for t in texts]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a@x.test", ["a@x.test"]),
        ("undisclosed-recipients:;", []),
        ("undisclosed-recipients: ;", []),
        ("team: a@x.test, b@y.test;", ["a@x.test", "b@y.test"]),
        ('"Doe, J" <j@x.test>, k@y.test (note)', ["j@x.test", "k@y.test"]),
        ("a@x.test (comment, with comma), b@y.test", ["a@x.test", "b@y.test"]),
        ("Pete(A nice \\) chap) <pete(his account)@silly.test(his host)>", ["pete@silly.test"]),
        (
            "A Group:Ed Jones <c@a.test>,joe@where.test,John <jdoe@one.test>;, Mary <m@x.test>",
            ["c@a.test", "joe@where.test", "jdoe@one.test", "m@x.test"],
        ),
        ("g1:;, g2: a@b.test;", ["a@b.test"]),
        ('"a:b;c" <q@r.test>', ["q@r.test"]),
        ("=?utf-8?q?J=C3=B6rg?= <j@x.test>", ["j@x.test"]),
        ("a@x.test,, ,b@y.test,", ["a@x.test", "b@y.test"]),
        ("(only a comment)", []),
        ("", []),
        ("bob", ["bob@example.com"]),
        ("Bob <bob>", ["bob@example.com"]),
        ("a@[192.0.2.1]", ["a@[192.0.2.1]"]),
        ('"john doe"@x.test', ['"john doe"@x.test']),
        ("<a@X.Test>", ["a@x.test"]),
    ],
)
def test_parse_address_list(value: str, expected: list[str]) -> None:
    assert [str(a) for a in parse_address_list(value, D)] == expected


@pytest.mark.parametrize(
    "value",
    [
        "a@b.test c@d.test",  # missing comma: must not silently drop c@d
        "a@b.test; c@d.test",  # ";" outside a group
        "<>",
        "x@y@z.test",
        "a@x.test.",
        "a@",
        "@x.test",
        "foo bar baz",
        "a@b.test (unclosed",
        '"unclosed <a@b.test>',
        "Joe <a@b.test",
        "a@[1.2.3.4",
        "a@-x.test",
        "ä@x.test",
        "a\x00@b.test",
        "a@b.test:;",  # an address is no group name
        ":;",  # a group needs a name
        "x: y: z@w.test;;",  # groups do not nest
        "x" * (MAX_ITEM_LENGTH + 1) + "@x.test",
        "(" * 5000,
        "\\" * 5000,
    ],
)
def test_malformed_lists_are_refused(value: str) -> None:
    with pytest.raises(RecipientError):
        parse_address_list(value, D)


def test_split_keeps_group_names_as_items() -> None:
    assert split_address_list("team: a@x, b@y;") == ["team:", "a@x", "b@y"]
    assert split_address_list("undisclosed-recipients:;") == ["undisclosed-recipients:"]
    assert split_address_list('"a, b" <c@d>, (x, y) e@f, <"g,h"@i>') == [
        '"a, b" <c@d>',
        "(x, y) e@f",
        '<"g,h"@i>',
    ]
    assert split_address_list("[a,b]@c, d") == ["[a,b]@c", "d"]


def test_recipient_values_plain_and_resent() -> None:
    fields = [("To", "a"), ("From", "f"), ("CC", "b"), ("bcc", "c"), ("Reply-To", "r")]
    assert recipient_values(fields) == ["a", "b", "c"]
    resent = [*fields, ("Resent-Date", "x"), ("Resent-To", "e"), ("RESENT-BCC", "g")]
    assert recipient_values(resent) == ["e", "g"]
    # Any Resent-* field counts, even one that names nobody.
    assert recipient_values([("To", "a"), ("Resent-Message-ID", "<x@y>")]) == []


def test_extract_deduplicates_domain_case_insensitively_in_first_mention_order() -> None:
    fields = [
        ("To", "b@Remote.test, a@x.test"),
        ("Cc", "B <b@REMOTE.TEST>"),
        ("Bcc", "a@x.test, c@y.test"),
    ]
    assert extract_recipients(fields, D) == addrs("b@remote.test", "a@x.test", "c@y.test")


def test_extract_local_part_case_is_kept() -> None:
    # Whether Bob and bob are one mailbox is the delivery side's decision, not ours.
    assert extract_recipients([("To", "Bob@x.test, bob@x.test")], D) == [
        Address("Bob", "x.test"),
        Address("bob", "x.test"),
    ]


def test_extract_limit() -> None:
    three = [("To", "a@x.test, b@x.test"), ("Cc", "c@x.test")]
    assert len(extract_recipients(three, D, max_recipients=3)) == 3
    with pytest.raises(TooManyRecipients):
        extract_recipients([*three, ("Bcc", "d@x.test")], D, max_recipients=3)


def test_extract_bounds_parsing_work_on_repeats() -> None:
    # Thousands of repeats of one address dedupe to one, but are not all parsed.
    with pytest.raises(TooManyRecipients):
        extract_recipients([("To", ", ".join(["a@x.test"] * 5000))], D, max_recipients=100)
    # Empty items cost nothing and do not count.
    assert extract_recipients([("To", "," * 100000 + "a@x.test")], D) == addrs("a@x.test")


def test_malformed_anywhere_refuses_everything() -> None:
    with pytest.raises(RecipientError):
        extract_recipients([("To", "a@x.test"), ("Cc", "b@@y.test")], D)


_atom = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_+", min_size=1, max_size=12)
_label = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=10)
_address = st.builds(
    lambda local, labels: Address(local, ".".join(labels)),
    _atom,
    st.lists(_label, min_size=1, max_size=3),
)
_name = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E, blacklist_characters='"\\'),
    max_size=20,
)


def _render(address: Address, name: str, style: int, upper: bool) -> str:
    domain = address.domain.upper() if upper else address.domain
    spec = f"{address.local}@{domain}"
    if style == 0:
        return spec
    if style == 1:
        return f'"{name}" <{spec}>'
    return f"{spec} ({name.replace('(', '').replace(')', '')})"


@settings(max_examples=200)
@given(
    st.lists(st.tuples(_address, _name, st.integers(0, 2), st.booleans()), min_size=1, max_size=12),
    st.lists(st.integers(0, 2), min_size=12, max_size=12),
    st.booleans(),
)
def test_rendered_lists_round_trip(
    entries: list[tuple[Address, str, int, bool]], field_of: list[int], grouped: bool
) -> None:
    """However the addresses are dressed up and spread over fields, the same set comes back."""
    names = ("To", "Cc", "Bcc")
    per_field: dict[str, list[str]] = {n: [] for n in names}
    for i, (address, name, style, upper) in enumerate(entries):
        per_field[names[field_of[i]]].append(_render(address, name, style, upper))
    fields = []
    for n in names:
        if not per_field[n]:
            continue
        value = ", ".join(per_field[n])
        fields.append((n, f"list: {value};" if grouped else value))
    expected = list(dict.fromkeys(a for a, *_ in entries))
    got = extract_recipients(fields, D, max_recipients=100)
    assert sorted(got) == sorted(expected)
    assert len(got) == len(set(got))


@given(st.text(max_size=300))
def test_arbitrary_text_never_crashes(value: str) -> None:
    """Either addresses or RecipientError: never another exception."""
    try:
        result = extract_recipients([("To", value)], D)
    except RecipientError:
        return
    assert all(isinstance(a, Address) for a in result)
