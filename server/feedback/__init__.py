"""POST /v1/feedback: a rating (and optionally a correction) joined to a recorded request."""
