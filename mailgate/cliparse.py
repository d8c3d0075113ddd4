"""argparse for the admin commands: errors and help become exceptions, never sys.exit.

Each command's ``main(argv, stdin, stdout, stderr)`` then writes to the streams it was
given and returns an exit status, which keeps the CLI testable in-process.
"""

from __future__ import annotations

import argparse
from typing import NoReturn


class ParserExit(Exception):
    """What argparse wanted to print, and the status it wanted to exit with."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


class Parser(argparse.ArgumentParser):
    """argparse that reports through :class:`ParserExit`."""

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise ParserExit(status, message or "")

    def error(self, message: str) -> NoReturn:
        raise ParserExit(2, f"{self.format_usage()}{self.prog}: error: {message}\n")

    def print_help(self, file: object = None) -> None:
        raise ParserExit(0, self.format_help())

    def print_usage(self, file: object = None) -> None:
        raise ParserExit(0, self.format_usage())
