"""Mail storage: the Maildir store behind :class:`~mailgate.interfaces.IMailStore`."""

from mailgate.store.maildir import MaildirStore

__all__ = ["MaildirStore"]
