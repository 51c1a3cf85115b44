"""Traffic sampling: records of served requests, redacted, written off the request path."""
