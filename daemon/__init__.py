"""cellwatch daemon: the command line, configuration and the streaming pipeline."""

__version__ = "0.1.0"
