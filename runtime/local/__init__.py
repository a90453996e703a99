"""The local scheduler: each app process runs under its own small supervisor on this machine."""
