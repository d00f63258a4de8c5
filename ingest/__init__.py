"""Ingest: readers and sources that turn robot data into cycles and samples.

Adapters here never import the daemon.
"""
