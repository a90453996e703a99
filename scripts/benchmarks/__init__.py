"""DevFlow's benchmarks: each module compares DevFlow with a reference, side by side in one run."""
