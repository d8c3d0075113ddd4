"""parse_account: the SDPS login-name forms (checklist 0.3) and path safety."""

from __future__ import annotations

import pytest

from mailgate.errors import AddressError
from mailgate.model import Address, parse_account

KNOWN = ("example.com", "Other.Example")
JOHN = Address("john", "example.com")


@pytest.mark.parametrize(
    "login",
    ["john", "john@example.com", "john+example.com", "JOHN@EXAMPLE.COM", "john+EXAMPLE.com"],
)
def test_every_sdps_form_reaches_the_same_account(login: str) -> None:
    assert parse_account(login, "example.com", known_domains=KNOWN) == JOHN


def test_plus_form_picks_the_known_domain() -> None:
    assert parse_account("john+other.example", "example.com", known_domains=KNOWN) == Address(
        "john", "other.example"
    )


def test_plus_with_an_unknown_domain_stays_in_the_local_part() -> None:
    assert parse_account("john+lists", "example.com", known_domains=KNOWN) == Address(
        "john+lists", "example.com"
    )
    # Without known domains the "+" form is never split (the old behaviour).
    assert parse_account("john+example.com", "example.com") == Address(
        "john+example.com", "example.com"
    )


def test_last_plus_splits() -> None:
    assert parse_account("a+b+example.com", "x.org", known_domains=KNOWN) == Address(
        "a+b", "example.com"
    )


def test_case_folding_is_a_switch() -> None:
    assert parse_account("John+example.com", "x.org", False, KNOWN) == Address(
        "John", "example.com"
    )


@pytest.mark.parametrize(
    "login",
    [
        "",
        "../etc+example.com",
        "a/b+example.com",
        "a%b@example.com",
        "a\\b+example.com",
        "a\0b+example.com",
        "..@example.com",
        "john@exa/mple.com",
        "john@",
        "x" * 65 + "+example.com",
    ],
)
def test_path_unsafe_logins_are_refused(login: str) -> None:
    with pytest.raises(AddressError):
        parse_account(login, "example.com", known_domains=KNOWN)


@pytest.mark.parametrize("login", ["alice\n", "0\n", "alice@example.com\n", "a\r"])
def test_a_trailing_line_end_never_passes_for_a_name(login: str) -> None:
    """`$` in a regex also matches before a final newline; the grammar must not."""
    with pytest.raises(AddressError):
        parse_account(login, "example.com")
    with pytest.raises(AddressError):
        Address.parse(login if "@" in login else login.replace("\n", "") + "@x.example\n")
