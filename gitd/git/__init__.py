"""Git repositories and the pack exchange (C git or dulwich) behind SSH and HTTP."""
