"""POP3 server: the protocol, its factory and its per-listener settings."""

from mailgate.pop3.server import Pop3Factory, Pop3Server, Pop3Settings

__all__ = ["Pop3Factory", "Pop3Server", "Pop3Settings"]
