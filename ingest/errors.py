"""Errors raised by ingest adapters. The daemon turns them into clear messages, never tracebacks."""


class IngestError(Exception):
    """Base class: a source cannot be opened or read as configured."""


class VorausFormatError(IngestError):
    """A file is not in the voraus-AD layout: the message names the column, what was expected and found."""
