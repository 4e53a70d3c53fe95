"""A child for safe_train.py's tests: allocates memory fast (real pages, written), recording how much it
holds after each step in <out_dir>/allocated.txt, until it is stopped."""
import os
import signal
import sys
import time

signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # "free your caches": it has none to free, as train.py would

out_dir = next(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--out_dir="))
step_mb, pause = 40, 0.05  # 800 MB/s
held = []
while len(held) * step_mb < 8000:
    held.append(b"\x01" * (step_mb << 20))
    with open(os.path.join(out_dir, "allocated.txt"), "a") as f:
        f.write(f"{len(held) * step_mb}\n")
    time.sleep(pause)
