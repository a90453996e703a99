"""gitd: the DevFlow daemon, its git front door, identity and management API."""

__version__ = "0.1.0"
