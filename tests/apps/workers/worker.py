"""A background worker: no port, just a line of log output every second."""
import time

tick = 0
while True:
    tick += 1
    print(f"worker tick {tick}", flush=True)
    time.sleep(1)
