"""Anomaly models (normalizing flows). Models never import the daemon, ingest or sinks."""
