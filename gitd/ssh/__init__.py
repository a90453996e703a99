"""The SSH front door: public-key auth, git pack exchange and management commands."""
