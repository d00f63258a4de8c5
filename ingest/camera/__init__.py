"""Camera sources: frames from a folder, a video file or stream, or JPEG/PNG payloads over MQTT and Kafka."""
