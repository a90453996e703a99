"""Dokku-style management commands, defined once for SSH and the `devflow` CLI."""
