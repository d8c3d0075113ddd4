"""The benchmark runner: mailgate and, when installed, Dovecot/Postfix side by side.

    python -m benchmarks.run [--quick] [--profile]

Seeds identical Maildirs, starts every server as a foreground child on loopback ports, runs
the rounds interleaved (server order alternating), prints one table and saves JSON and
markdown under benchmarks/results/, compared with the previous run of the same mode.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks import loadgen, report, scenarios, seed, servers
from benchmarks.procstat import settle, settle_tree, tree
from benchmarks.scenarios import Figures, Sizes
from mailgate import lagprobe

RESULTS = Path(__file__).resolve().parent / "results"


class Stack:
    """The running servers of one run and how to reach each scenario's peer."""

    def __init__(self, tmp: Path, sizes: Sizes, profile: Path | None) -> None:
        self.tmp = tmp
        self.sizes = sizes
        self.mailgate: servers.Server | None = None
        self.dovecot: servers.Server | None = None
        self.postfix: servers.Server | None = None
        self.postfix_conf: Path | None = None
        self.dovecot_conf: Path | None = None
        self.profile = profile

    def setup(self) -> None:
        tmp, sizes = self.tmp, self.sizes
        os.chmod(tmp, 0o755)  # Dovecot's auth and Postfix's delivery run as other users
        print(f"seeding Maildirs in {tmp} ...", flush=True)
        t = time.monotonic()
        seed.seed(str(tmp / "seed"), sizes.boxes())
        mg = tmp / "mailgate"
        # {PLAIN} accounts for every scenario but one: the peers' cost per login is then
        # the protocol and the server, not the password hash (Dovecot has no cache of
        # verifications; mailgate has, so with Argon2id the session ratio is mostly that).
        # pop3_session_argon2 measures the same sessions with Argon2id accounts.
        for box in sizes.boxes():
            scheme = "ARGON2ID" if scenarios.argon2_account(box.local) else "PLAIN"
            servers.mailgate_cli(
                mg, "user", "add", "--scheme", scheme, f"{box.local}@{seed.DOMAIN}",
                stdin=servers.PASSWORD + "\n",
            )  # fmt: skip
        # Idle-connection accounts: too many for the CLI's Argon2id (0.1 s each), and the
        # scenario measures memory, not hashing, so they get {PLAIN} entries in the same file.
        with open(mg / "users", "a") as f:
            f.writelines(f"idle{i:05d}@{seed.DOMAIN}:{{PLAIN}}idle\n" for i in range(sizes.idle))
        seed.link_copy(str(tmp / "seed"), str(mg / "mail"))
        print(f"  seeded in {time.monotonic() - t:.1f} s", flush=True)
        self.mailgate = servers.start_mailgate(mg, self.profile)
        cert, key = mg / "tls" / "cert.pem", mg / "tls" / "key.pem"
        if servers.dovecot_available():
            dc = tmp / "dovecot"
            dc.mkdir()
            os.chmod(dc, 0o755)
            seed.link_copy(str(tmp / "seed"), str(dc / "mail"))
            servers.chown_tree(dc / "mail")
            shutil.copy(mg / "users", dc / "passwd")
            os.chmod(dc / "passwd", 0o644)
            shutil.copy(cert, dc / "cert.pem")
            shutil.copy(key, dc / "key.pem")
            conf = servers.dovecot_config(
                dc, dc / "passwd", dc / "cert.pem", dc / "key.pem", sizes.idle
            )
            self.dovecot_conf = conf
            self.dovecot = servers.start_dovecot(dc, conf)
            if servers.postfix_available():
                pf = tmp / "postfix"
                pf.mkdir()
                os.chmod(pf, 0o755)
                self.postfix_conf = servers.postfix_config(
                    pf, dc / "run" / "auth-client", dc / "cert.pem", dc / "key.pem"
                )
                self.postfix = servers.start_postfix(pf, self.postfix_conf)

    def stop(self) -> None:
        if self.postfix is not None and self.postfix_conf is not None:
            servers.stop_postfix(self.postfix, self.postfix_conf)
        for s in (self.dovecot, self.mailgate):
            if s is not None:
                s.stop()

    def restart_pop3(self) -> None:
        """Fresh mailgate and Dovecot processes (Postfix's logins go through Dovecot, so
        only for scenarios after the submission ones)."""
        if self.mailgate is not None:
            self.mailgate.stop()  # with --profile, this writes the rounds' profile
            self.mailgate = servers.start_mailgate(self.tmp / "mailgate", None)
        if self.dovecot is not None and self.dovecot_conf is not None:
            self.dovecot.stop()
            self.dovecot = servers.start_dovecot(self.tmp / "dovecot", self.dovecot_conf)

    def pop3_pair(self) -> list[servers.Server]:
        return [s for s in (self.mailgate, self.dovecot) if s is not None]

    def smtp_pair(self) -> list[tuple[servers.Server, list[int]]]:
        """Submission servers with the process trees that do their work (Postfix+Dovecot auth)."""
        out: list[tuple[servers.Server, list[int]]] = []
        if self.mailgate is not None:
            out.append((self.mailgate, self.mailgate.roots))
        if self.postfix is not None and self.dovecot is not None:
            out.append((self.postfix, self.postfix.roots + self.dovecot.roots))
        return out


Samples = dict[str, dict[str, dict[str, list[float]]]]  # scenario -> server -> figure -> values


def _add(samples: Samples, scenario: str, server: str, figures: Figures) -> None:
    per = samples.setdefault(scenario, {}).setdefault(server, {})
    for k, v in figures.items():
        per.setdefault(k, []).append(v)


def run(stack: Stack, sizes: Sizes, only: set[str] | None) -> Samples:
    samples: Samples = {}

    def want(name: str) -> bool:
        return only is None or name in only

    def each(
        name: str, fn: Callable[[servers.Server, list[int]], Figures], smtp: bool, rnd: int
    ) -> None:
        if not want(name):
            return
        pairs = stack.smtp_pair() if smtp else [(s, s.roots) for s in stack.pop3_pair()]
        if rnd % 2:
            pairs.reverse()  # interleave: alternate who goes first
        for server, roots in pairs:
            waited = settle()
            if waited > 2:
                quiet = "went quiet" if waited < 10 else "stayed busy; measuring anyway"
                print(f"  (waited {waited:.0f} s: the machine {quiet})")
            print(f"  {name:24} {server.name:9}", end=" ", flush=True)
            start = time.time()
            try:
                figures = fn(server, roots)
            except Exception as e:  # one broken scenario must not lose the whole run
                print(f"FAILED: {type(e).__name__}: {e}", flush=True)
                continue
            _add_lag(figures, server, start)
            _add(samples, name, server.name, figures)
            main = next(iter(figures.items()))
            print(f"{main[0]}={main[1]:.2f}", flush=True)

    # First, on fresh servers: Argon2id load leaves memory behind that would blur this.
    if want("idle"):
        for server in stack.pop3_pair():
            settle()
            before = len(tree(server.roots))
            print(f"  idle x{sizes.idle:<17} {server.name:9}", end=" ", flush=True)
            start = time.time()
            try:
                figures = scenarios.idle_connections(server, sizes.idle)
            except Exception as e:
                print(f"FAILED: {type(e).__name__}: {e}", flush=True)
            else:
                _add_lag(figures, server, start)
                _add(samples, "idle", server.name, figures)
                print(
                    f"held={figures['held']:.0f} kb/conn={figures['kb_per_conn']:.1f}", flush=True
                )
            # Dovecot keeps a process per held session until it reaps them.
            waited = settle_tree(server.roots, before + 8)
            if waited > 2:
                print(f"  ({server.name} took {waited:.0f} s to reap its idle processes)")
    for rnd in range(sizes.rounds):
        print(f"round {rnd + 1}/{sizes.rounds}", flush=True)
        each("pop3_session", lambda s, r: scenarios.pop3_sessions(s, sizes), False, rnd)
        each("pop3s_session", lambda s, r: scenarios.pop3_sessions(s, sizes, True), False, rnd)
        each(
            "pop3_session_argon2",
            lambda s, r: scenarios.pop3_sessions(s, sizes, users=scenarios.ARGON2_USERS),
            False,
            rnd,
        )
        each("retr_big", lambda s, r: scenarios.retr_big(s), False, rnd)
        each("retr_big_unmarked", lambda s, r: scenarios.retr_big(s, "bigx"), False, rnd)
        each("submit_1_per_conn", lambda s, r: scenarios.submissions(s, r, sizes, 1), True, rnd)
        each("submit_100_per_conn", lambda s, r: scenarios.submissions(s, r, sizes, 100), True, rnd)
        each("pop3s_handshake", lambda s, r: scenarios.handshakes(s, r, sizes, "pop3"), False, rnd)
        each(
            "submissions_handshake",
            lambda s, r: scenarios.handshakes(s, r, sizes, "smtp"),
            True,
            rnd,
        )
    # Last, on freshly started servers (as the idle scenario runs first): a process that
    # scanned the 100,000-message maildrop keeps its snapshot cached (~80 MB), and which of
    # the two processes got those logins is the kernel's choice, so before the rounds it
    # made their peak-memory figures a coin toss (216 or ~300 MB). After the rounds, in
    # processes that had served them, both servers' first logins took 15-25% more CPU.
    if want("huge_maildrop"):
        try:
            stack.restart_pop3()
        except Exception as e:  # the rounds' samples must not be lost with it
            print(f"  huge_maildrop: restart FAILED: {type(e).__name__}: {e}", flush=True)
            return samples
        for server in stack.pop3_pair():
            settle()
            start = time.time()
            try:
                first, *later = scenarios.huge_maildrop(server, 1 + sizes.later_logins)
            except Exception as e:
                print(f"  huge_maildrop {server.name} FAILED: {type(e).__name__}: {e}")
                continue
            _add_lag(first, server, start)  # the first login and the later ones
            _add(samples, "huge_maildrop_first", server.name, first)
            for figures in later:
                _add(samples, "huge_maildrop_later", server.name, figures)
            print(f"  huge_maildrop            {server.name:9} first={first['login_stat_s']:.2f}s")
    return samples


def _add_lag(figures: Figures, server: servers.Server, start: float) -> None:
    """The worst reactor lag of the run that just ended (mailgate's probe; see
    mailgate/lagprobe.py): a blocked reactor delays every session it serves."""
    if server.lag_dir is not None:
        # Lag is reported in the second the late tick came, and a second's report is
        # written at a process's first tick of the next one: so read up to the second after
        # the run (a stall spanning its end, work the run left behind such as closing
        # 10,000 idle sessions), once every process has reported that second.
        end = time.time() + 1
        directory = str(server.lag_dir)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            latest = lagprobe.latest_report(directory)
            if latest is None or latest >= int(end):
                break
            time.sleep(0.05)
        worst = lagprobe.worst_lag_ms(directory, start, end)
        if worst is not None:
            figures["reactor_lag_max_ms"] = worst


def medians(samples: Samples) -> dict[str, dict[str, dict[str, float]]]:
    return {
        sc: {srv: {k: statistics.median(v) for k, v in figs.items()} for srv, figs in per.items()}
        for sc, per in samples.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run")
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller sizes")
    parser.add_argument("--only", action="append", help="run only this scenario (repeatable)")
    parser.add_argument(
        "--profile", metavar="FILE", help="run mailgate under cProfile, stats saved to FILE"
    )
    parser.add_argument("--rounds", type=int, help="override the mode's number of rounds")
    parser.add_argument("--duration", type=float, help="override seconds per load run")
    parser.add_argument("--no-save", action="store_true", help="print the table only")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory")
    args = parser.parse_args(argv)
    sizes = scenarios.QUICK if args.quick else scenarios.FULL
    mode = "quick" if args.quick else "full"
    if args.rounds or args.duration:
        sizes = dataclasses.replace(
            sizes, rounds=args.rounds or sizes.rounds, duration=args.duration or sizes.duration
        )
    tmp = Path(tempfile.mkdtemp(prefix="mgbench-"))
    profile = Path(args.profile).resolve() if args.profile else None
    stack = Stack(tmp, sizes, profile)
    started = time.time()
    try:
        stack.setup()
        samples = run(stack, sizes, set(args.only) if args.only else None)
    finally:
        stack.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    result = report.Result(
        mode=mode,
        started=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        duration_s=time.time() - started,
        sizes=sizes.__dict__,
        machine={
            "cpus": os.cpu_count() or 0,
            "python": sys.version.split()[0],
            "loop": loadgen.loop_name(),
        },
        peers={
            "pop3": "dovecot" if stack.dovecot else "n/a",
            "submission": "postfix" if stack.postfix else "n/a",
        },
        figures=medians(samples),
    )
    previous = report.previous(RESULTS, mode)
    text = report.markdown(result, previous, args.only)
    print()
    print(text)
    if not args.no_save and not args.only and profile is None:
        paths = report.save(RESULTS, result, text)
        print(f"saved {', '.join(str(p) for p in paths)}")
    if profile is not None:
        print(f"cProfile stats of mailgate's reactor thread: {profile}")
        print("  .venv/bin/python -m pstats " + str(profile) + "  (then: sort tottime, stats 25)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
