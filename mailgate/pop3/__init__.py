"""POP3 server: the protocol, its factory and its per-listener settings."""

from mailgate.pop3.server import LoginTimes, Pop3Factory, Pop3Profile, Pop3Server, Pop3Settings

__all__ = ["LoginTimes", "Pop3Factory", "Pop3Profile", "Pop3Server", "Pop3Settings"]
