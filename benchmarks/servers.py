"""Start and stop mailgate, Dovecot and Postfix as foreground children on loopback ports.

Each server gets a throw-away directory under the run's temp dir. Nothing is installed and no
system configuration is touched: the peers run from their own config files with ``-c``.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.procstat import wait_port

REPO = Path(__file__).resolve().parent.parent
#: Which mailgate source tree to run: this checkout, or e.g. a ``git worktree`` of a commit.
SOURCE = Path(os.environ.get("MAILGATE_SRC", str(REPO))).resolve()
PASSWORD = "bench-Secret-1"


def _raise_limits() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 200_000)), hard))


@dataclass
class Ports:
    pop3: int = 0
    pop3s: int = 0
    submission: int = 0
    submissions: int = 0


@dataclass
class Server:
    """One running server stack; ``roots`` are the pids whose process trees it owns."""

    name: str
    ports: Ports
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    #: Where mailgate's processes report their reactor lag (mailgate.lagprobe); None: no probe.
    lag_dir: Path | None = None

    @property
    def roots(self) -> list[int]:
        return [p.pid for p in self.procs if p.poll() is None]

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        self.procs.clear()


def _source_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SOURCE), env.get("PYTHONPATH")]))
    return env


def _spawn(
    cmd: list[str], log: Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd,
            env={**_source_env(), **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            preexec_fn=_raise_limits,
        )


def _wait_ports(server: Server, ports: list[int]) -> None:
    for port in ports:
        deadline = time.monotonic() + 60
        while not wait_port(port, 1.0) and time.monotonic() < deadline:
            if any(p.poll() is not None for p in server.procs):
                break  # it died: no point waiting
        if not wait_port(port, 0.5):
            tail = "".join(p.read_text(errors="replace")[-2000:] for p in server.logs if p.exists())
            server.stop()
            raise RuntimeError(f"{server.name} did not listen on {port}:\n{tail}")


# -- mailgate ----------------------------------------------------------------------------

MAILGATE_PORTS = Ports(21110, 21995, 21587, 21465)


def mailgate_cli(state: Path, *args: str, stdin: str = "") -> None:
    """The ``mailgate`` admin command, as an operator would run it."""
    exe = Path(sys.executable).parent / "mailgate"
    subprocess.run(
        [str(exe), "--state-dir", str(state), *args],
        input=stdin.encode(),
        check=True,
        cwd=SOURCE,
        env=_source_env(),
    )


#: The benchmark is a load test from one address (127.0.0.1): mailgate's production defaults
#: (max_per_peer 20, max_connections 1000) would turn most of its connections away.
MAILGATE_CONFIG = """\
[limits]
max_connections = 20000
max_per_peer = 20000
"""


def start_mailgate(state: Path, profile: Path | None = None) -> Server:
    twistd = Path(sys.executable).parent / "twistd"
    p = MAILGATE_PORTS
    config = state / "mailgate.toml"
    config.write_text(MAILGATE_CONFIG)
    cmd = [str(twistd), "-n", "--pidfile=", f"--logfile={state / 'twistd.log'}"]
    if profile is not None:
        cmd += [f"--profile={profile}", "--profiler=cprofile", "--savestats"]
    cmd += [
        "mailgate",
        "--config", str(config),
        "--state-dir", str(state),
        "--hostname", "bench.localhost",
        "--default-domain", "bench.test",
        "--pop3", f"tcp:{p.pop3}:interface=127.0.0.1:backlog=1024",
        "--pop3s", f"tcp:{p.pop3s}:interface=127.0.0.1:backlog=1024",
        "--submission", f"tcp:{p.submission}:interface=127.0.0.1:backlog=1024",
        "--submissions", f"tcp:{p.submissions}:interface=127.0.0.1:backlog=1024",
        "--allow-plaintext-from", "127.0.0.0/8",
    ]  # fmt: skip
    server = Server("mailgate", p, logs=[state / "twistd.log", state / "stdout.log"])
    server.lag_dir = state / "lag"
    probe = {"MAILGATE_LAG_PROBE": str(server.lag_dir)}
    server.procs.append(_spawn(cmd, state / "stdout.log", cwd=SOURCE, env=probe))
    _wait_ports(server, [p.pop3, p.pop3s, p.submission, p.submissions])
    return server


# -- Dovecot -----------------------------------------------------------------------------

DOVECOT_PORTS = Ports(pop3=22110, pop3s=22995)
#: Dovecot refuses to access mail as root: its Maildirs belong to nobody.
MAIL_UID, MAIL_GID = 65534, 65534


def chown_tree(root: Path, uid: int = MAIL_UID, gid: int = MAIL_GID) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        os.chown(dirpath, uid, gid)
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)


POSTFIX_PORTS = Ports(submission=23587, submissions=23465)


def dovecot_available() -> bool:
    return shutil.which("dovecot") is not None and Path("/usr/lib/dovecot/pop3").exists()


def postfix_available() -> bool:
    return shutil.which("postfix") is not None and Path("/etc/postfix/master.cf").exists()


def dovecot_config(base: Path, passwd: Path, cert: Path, key: Path, max_conns: int) -> Path:
    """A standalone dovecot.conf (2.3 syntax): POP3 only, passwd-file users, Maildirs."""
    (base / "run").mkdir(parents=True, exist_ok=True)
    (base / "state").mkdir(exist_ok=True)
    limit = max_conns + 200
    conf = f"""
base_dir = {base}/run
state_dir = {base}/state
instance_name = mgbench
log_path = {base}/dovecot.log
protocols = pop3
listen = 127.0.0.1
ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}
disable_plaintext_auth = no
auth_mechanisms = plain login
first_valid_uid = 1
mail_location = maildir:{base}/mail/%d/%n/Maildir
default_process_limit = {limit}
default_client_limit = {limit * 2}
default_vsz_limit = 0
passdb {{
  driver = passwd-file
  args = {passwd}
}}
userdb {{
  driver = static
  args = uid={MAIL_UID} gid={MAIL_GID} home={base}/mail/%d/%n
}}
protocol pop3 {{
  mail_max_userip_connections = {limit}
  pop3_uidl_format = %08Xu%08Xv
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {DOVECOT_PORTS.pop3}
  }}
  inet_listener pop3s {{
    address = 127.0.0.1
    port = {DOVECOT_PORTS.pop3s}
    ssl = yes
  }}
  service_count = 0
  process_min_avail = 2
  client_limit = {limit}
}}
service pop3 {{
  process_limit = {limit}
  # Reuse pop3 processes across sessions (the issue's "service_count=0" figure) rather
  # than one fork per session, Dovecot's high-performance mode.
  service_count = 0
  process_min_avail = 4
  # After the idle scenario 10,000 pop3 processes sit idle until idle_kill (1 min by
  # default), and while they did the next round measured ~23 sessions/s. Under load no
  # process is idle for 5 s, so this changes nothing else.
  idle_kill = 5 secs
}}
service auth {{
  unix_listener auth-client {{
    mode = 0666
  }}
  client_limit = {limit * 2 + 100}
}}
service anvil {{
  client_limit = {limit * 2 + 100}
}}
"""
    path = base / "dovecot.conf"
    path.write_text(conf)
    return path


def start_dovecot(base: Path, conf: Path) -> Server:
    server = Server("dovecot", DOVECOT_PORTS, logs=[base / "dovecot.log", base / "stdout.log"])
    server.procs.append(_spawn(["dovecot", "-F", "-c", str(conf)], base / "stdout.log"))
    _wait_ports(server, [DOVECOT_PORTS.pop3, DOVECOT_PORTS.pop3s])
    return server


# -- Postfix -----------------------------------------------------------------------------


def postfix_config(base: Path, auth_socket: Path, cert: Path, key: Path) -> Path:
    """A private Postfix instance: submission ports only, SASL through Dovecot, virtual Maildir."""
    conf = base / "etc"
    conf.mkdir(parents=True, exist_ok=True)
    mail = base / "mail"
    mail.mkdir(exist_ok=True)
    import pwd

    pw = pwd.getpwnam("postfix")
    os.chown(mail, pw.pw_uid, pw.pw_gid)
    main = f"""
compatibility_level = 3.6
queue_directory = {base}/queue
data_directory = {base}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = bench.localhost
mydomain = localhost
myorigin = $myhostname
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
local_recipient_maps =
relayhost =
maillog_file = {base}/maillog
maillog_file_prefixes = {base}
virtual_mailbox_domains = bench.test
virtual_mailbox_base = {mail}
virtual_mailbox_maps = static:inbox/Maildir/
virtual_uid_maps = static:{pw.pw_uid}
virtual_gid_maps = static:{pw.pw_gid}
virtual_minimum_uid = 1
smtpd_sasl_type = dovecot
smtpd_sasl_path = {auth_socket}
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
smtpd_tls_security_level = may
smtpd_relay_restrictions = permit_sasl_authenticated, reject
smtpd_recipient_restrictions = permit_sasl_authenticated, reject
message_size_limit = 60000000
default_process_limit = 200
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
anvil_rate_time_unit = 60s
# No pause per message when delivery lags behind acceptance (Postfix's default is up to
# 1 s): with it, 16 clients flooding made some runs measure 15 msgs/s instead of ~1,000.
in_flow_delay = 0
"""
    (conf / "main.cf").write_text(main)
    lines = []
    for line in Path("/etc/postfix/master.cf").read_text().splitlines():
        parts = line.split()
        if not line or line[0] in "# \t" or len(parts) < 8:
            lines.append(line)
            continue
        if parts[1] == "inet":  # no system smtp on port 25
            lines.append("#" + line)
            continue
        parts[4] = "n"  # chroot off: our queue lives outside /var/spool/postfix
        lines.append(" ".join(parts))
    sub = "inet n - n - - smtpd -o smtpd_sasl_auth_enable=yes -o smtpd_tls_auth_only=no"
    lines.append(f"127.0.0.1:{POSTFIX_PORTS.submission} {sub}")
    lines.append(f"127.0.0.1:{POSTFIX_PORTS.submissions} {sub} -o smtpd_tls_wrappermode=yes")
    (conf / "master.cf").write_text("\n".join(lines) + "\n")
    return conf


def start_postfix(base: Path, conf: Path) -> Server:
    server = Server("postfix", POSTFIX_PORTS, logs=[base / "maillog", base / "stdout.log"])
    import pwd

    env_cmd = ["postfix", "-c", str(conf)]
    (base / "queue").mkdir(exist_ok=True)
    (base / "data").mkdir(exist_ok=True)
    os.chown(base / "data", pwd.getpwnam("postfix").pw_uid, -1)
    # Creates the queue's subdirectories with Postfix's own owners and modes.
    subprocess.run([*env_cmd, "set-permissions"], capture_output=True, check=False)
    subprocess.run([*env_cmd, "check"], capture_output=True, check=False)
    server.procs.append(_spawn([*env_cmd, "start-fg"], base / "stdout.log"))
    _wait_ports(server, [POSTFIX_PORTS.submission, POSTFIX_PORTS.submissions])
    return server


def stop_postfix(server: Server, conf: Path) -> None:
    subprocess.run(["postfix", "-c", str(conf), "stop"], capture_output=True, check=False)
    deadline = time.monotonic() + 20
    while server.roots and time.monotonic() < deadline:
        time.sleep(0.2)
    server.stop()
