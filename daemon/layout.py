"""The names of what the daemon writes (InfluxDB measurements, JSON-lines `measurement` values).

A module of its own, with no imports, so that sinks and readers can use the names without pulling in
the pipeline (and with it the scorer and torch).
"""

from __future__ import annotations

from typing import Final

SCORE_MEASUREMENT: Final = "anomaly_score"  # one point per scored window
ALERT_MEASUREMENT: Final = "alert"  # one point per alert (time = start)
LOCALIZATION_MEASUREMENT: Final = "localization"  # the temporal-analysis map of each alert's peak window
IMAGE_SCORE_MEASUREMENT: Final = "image_score"  # one point per scored camera frame
CYCLE_MEASUREMENT: Final = "cycle_fused"  # a cycle's signal score and camera score(s) joined
