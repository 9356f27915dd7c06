"""mailgate: a mail login proxy for IMAP, POP3 and SMTP."""

__version__ = "0.1.0"
