"""Sinks: where scores and alerts go (InfluxDB line protocol with a durable spool, local files)."""
