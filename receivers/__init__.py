"""receivers: what a push (or, later, a forge webhook) means, and who hears about it."""
