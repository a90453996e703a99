"""Who is talking: users, SSH keys, HTTP tokens and per-app roles."""
