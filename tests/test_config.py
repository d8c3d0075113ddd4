"""Config validation: every mistake is an error naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailgate.config import (
    Config,
    Listener,
    load_config,
    network_predicate,
    read_auth_file,
    with_overrides,
)
from mailgate.errors import ConfigError
from mailgate.tap import Options


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "mailgate.toml"
    p.write_text(text)
    return p


def test_embedded_defaults() -> None:
    c = load_config(None)
    assert c.embedded_defaults
    assert [(x.name, x.endpoint) for x in c.listeners] == [
        ("pop3", "tcp:1110:interface=127.0.0.1"),
        ("pop3s", "tcp:1995:interface=127.0.0.1"),
        ("submission", "tcp:1587:interface=127.0.0.1"),
        ("submissions", "tcp:1465:interface=127.0.0.1"),
    ]
    assert c.allow_plaintext_from == ()
    assert c.cert_path == Path("mailgate-data/tls/cert.pem")


def test_full_file(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        """
hostname = "mail.example.com"
default_domain = "Example.COM"
local_domains = ["example.org"]
state_dir = "state"
allow_plaintext_from = ["127.0.0.0/8"]

[tls]
cert = "c.pem"
key = "k.pem"

[[listeners]]
protocol = "pop3"
endpoint = "tcp:2110:interface=127.0.0.1"
tls = "implicit"

[smtp]
max_size = 1048576
bare_newline = "reject"
""",
    )
    c = load_config(p)
    assert not c.embedded_defaults
    assert c.default_domain == "example.com"
    assert c.all_local_domains == ("example.com", "example.org")
    assert c.state_dir == tmp_path / "state"
    assert c.cert_path == tmp_path / "c.pem"
    assert c.listeners == (Listener("pop3", "tcp:2110:interface=127.0.0.1", "implicit"),)
    assert c.smtp.max_size == 1048576
    assert c.smtp.bare_newline == "reject"
    assert network_predicate(c.allow_plaintext_from)("127.0.0.1")
    assert not network_predicate(c.allow_plaintext_from)("10.0.0.1")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("colour = 1", "colour: unknown key"),
        ("[smtp]\nmax_sise = 5", "smtp.max_sise: unknown key"),
        ("[smtp]\nmax_size = 'big'", "smtp.max_size: expected"),
        ("[smtp]\nbare_newline = 'maybe'", "smtp.bare_newline: must be one of"),
        ("[pop3]\ntimeout = 30", "pop3.timeout: must be at least 600"),
        ("[smtp]\nrequire_tls = 1", "smtp.require_tls: expected bool"),
        ("[[listeners]]\nprotocol = 'imap'\nendpoint = 'tcp:1'", "listeners[0].protocol"),
        ("[[listeners]]\nprotocol = 'pop3'", "listeners[0].endpoint: required"),
        ("allow_plaintext_from = ['nope']", "allow_plaintext_from"),
        ("[tls]\ncert = 'x.pem'", "tls: give both"),
        ("default_domain = 'bad domain'", "default_domain"),
        ("this is = not toml", "not valid TOML"),
    ],
)
def test_errors_name_file_and_key(tmp_path: Path, text: str, fragment: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value)
    assert fragment in str(e.value)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


def test_command_line_overrides() -> None:
    o = Options()
    o.parseOptions(
        [
            "--state-dir",
            "/tmp/x",
            "--pop3",
            "tcp:0",
            "--submissions",
            "tcp:0",
            "--allow-plaintext-from",
            "127.0.0.1/32",
        ]
    )
    c = with_overrides(
        Config(),
        state_dir=o["state-dir"],
        listeners=o["listeners"],
        allow_plaintext_from=o["allow-plaintext-from"],
    )
    assert c.state_dir == Path("/tmp/x")
    assert [x.name for x in c.listeners] == ["pop3", "submissions"]
    assert network_predicate(c.allow_plaintext_from)("127.0.0.1")
    assert not network_predicate(c.allow_plaintext_from)("127.0.0.2")


def test_ipv4_mapped_peer_matches_ipv4_network() -> None:
    pred = network_predicate(
        with_overrides(Config(), allow_plaintext_from=["10.0.0.0/8"]).allow_plaintext_from
    )
    assert pred("::ffff:10.1.2.3")
    assert not pred("garbage")


def test_relay_queue_and_xtnd_keys(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        """
[pop3]
xtnd_xmit = true
xtnd_xlst = true

[[listeners]]
protocol = "pop3"
endpoint = "tcp:0"
xtnd_xmit = false

[relay]
smarthost = "tcp:127.0.0.1:2525"
tls = "required"
ca_file = "ca.pem"

[queue]
lifetime = 3600
first_retry = 10
delay_warning = 14400

[submission]
enforce_from = true
""",
    )
    c = load_config(p)
    assert c.pop3.xtnd_xmit and c.pop3.xtnd_xlst
    assert c.listeners[0].xtnd_xmit is False
    assert c.relay.smarthost == "tcp:127.0.0.1:2525"
    assert c.relay.tls == "required"
    assert c.relay.ca_file == tmp_path / "ca.pem"
    assert c.queue.lifetime == 3600 and c.queue.first_retry == 10
    assert c.queue.delay_warning == 14400
    assert load_config(write(tmp_path, "")).queue.delay_warning == 0  # off by default
    with pytest.raises(ConfigError, match=r"queue.delay_warning"):
        load_config(write(tmp_path, "[queue]\ndelay_warning = -1\n"))
    assert c.submission.enforce_from


def test_xtnd_xmit_only_on_pop3_listeners(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        "[[listeners]]\nprotocol = 'submission'\nendpoint = 'tcp:0'\nxtnd_xmit = true\n",
    )
    with pytest.raises(ConfigError, match=r"listeners\[0\].xtnd_xmit"):
        load_config(p)


def test_command_line_xtnd_and_smarthost(tmp_path: Path) -> None:
    auth = tmp_path / "auth"
    auth.write_text("relayuser:relay pass\n")
    o = Options()
    o.parseOptions(
        [
            "--xtnd-xmit",
            "--smarthost",
            "tcp:127.0.0.1:2525",
            "--smarthost-tls",
            "required",
            "--smarthost-auth-file",
            str(auth),
        ]
    )
    c = with_overrides(
        Config(),
        xtnd_xmit=bool(o["xtnd-xmit"]),
        smarthost=o["smarthost"],
        smarthost_tls=o["smarthost-tls"],
        smarthost_auth_file=o["smarthost-auth-file"],
    )
    assert all(x.xtnd_xmit for x in c.listeners if x.protocol == "pop3")
    assert c.relay.smarthost == "tcp:127.0.0.1:2525"
    assert c.relay.auth_file is not None
    assert read_auth_file(c.relay.auth_file) == ("relayuser", "relay pass")
    with pytest.raises(ConfigError, match="--smarthost-tls"):
        with_overrides(Config(), smarthost_tls="sometimes")


def test_auth_file_must_hold_user_and_password(tmp_path: Path) -> None:
    bad = tmp_path / "auth"
    bad.write_text("justauser\n")
    with pytest.raises(ConfigError, match="user:password"):
        read_auth_file(bad)


def test_legacy_limits_throttle_and_profile_keys(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        """
[pop3]
apop = "never"
login_delay = 60
expire = "NEVER"
sdps_env = true

max_commands = 500
max_junk = 0

[smtp]
max_junk = 5

[limits]
max_connections = 50
max_per_peer = 5
line_time = 10
min_rate = 0

[auth]
throttle_first = 1
throttle_cap = 4
throttle_exempt = ["10.0.0.0/8"]

[[listeners]]
protocol = "pop3"
endpoint = "tcp:0"
profile = { stls = false, sasl = ["plain"], parsing = "strict" }

[[listeners]]
protocol = "submission"
endpoint = "tcp:0"
profile = { pipelining = false, parsing = "lenient" }
""",
    )
    c = load_config(p)
    assert c.pop3.apop == "never" and c.pop3.login_delay == 60 and c.pop3.expire == "NEVER"
    assert c.pop3.sdps_env
    assert c.pop3.max_commands == 500 and c.pop3.max_junk == 0 and c.smtp.max_junk == 5
    assert c.limits.max_per_peer == 5 and c.limits.min_rate == 0
    assert c.auth.throttle_first == 1 and c.auth.throttle_cap == 4
    assert c.auth.throttle_exempt is not None
    assert dict(c.listeners[0].profile) == {"stls": False, "sasl": ("PLAIN",), "parsing": "strict"}
    assert dict(c.listeners[1].profile) == {"pipelining": False, "parsing": "lenient"}


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[pop3]\nexpire = 'soon'", "pop3.expire"),
        ("[pop3]\nlogin_delay = -1", "pop3.login_delay"),
        ("[auth]\nthrottle_first = 10\nthrottle_cap = 5", "auth.throttle_cap"),
        ("[limits]\nmax_per_peer = 0", "limits.max_per_peer"),
        (
            "[[listeners]]\nprotocol = 'pop3'\nendpoint = 'tcp:0'\nprofile = { starttls = false }",
            "listeners[0].profile.starttls: unknown key",
        ),
        (
            "[[listeners]]\nprotocol = 'pop3'\nendpoint = 'tcp:0'\nprofile = { sasl = ['NTLM'] }",
            "listeners[0].profile.sasl: unknown mechanism NTLM",
        ),
        (
            "[[listeners]]\nprotocol = 'submission'\nendpoint = 'tcp:0'\n"
            "profile = { parsing = 'sloppy' }",
            "listeners[0].profile.parsing",
        ),
    ],
)
def test_new_keys_are_validated(tmp_path: Path, text: str, fragment: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert fragment in str(e.value)
