"""The HTTP front door: smart git, the REST API and the status page."""
