"""Errors raised by ingest adapters. The daemon turns them into clear messages, never tracebacks."""


class IngestError(Exception):
    """Base class: a source cannot be opened or read as configured."""


class VorausFormatError(IngestError):
    """A file is not in the voraus-AD layout: the message names the column, what was expected and found."""


class ConfigurationError(IngestError):
    """A source cannot work as configured, found once it reads its input (a map that does not fit the
    bus): a restart would not help, so the daemon exits as for a bad config (status 2)."""
