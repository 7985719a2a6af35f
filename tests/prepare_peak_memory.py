"""Run a command; report its wall time and the peak resident memory of its main process and of
its whole process tree (sampled every 0.1 s), and the preparation's summary line.

    python tests/prepare_peak_memory.py python -m experiments.prepare_data --corpus ... --output ...
"""

import subprocess
import sys
import threading
import time

import psutil


def main() -> None:
    t = time.time()
    proc = subprocess.Popen(sys.argv[1:], stderr=subprocess.PIPE, text=True)
    main_proc = psutil.Process(proc.pid)
    peak_main = peak_tree = 0
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()))
    reader.start()
    while proc.poll() is None:
        try:
            rss = [q.memory_info().rss for q in [main_proc, *main_proc.children(recursive=True)]]
            peak_main = max(peak_main, rss[0])
            peak_tree = max(peak_tree, sum(rss))
        except psutil.Error:
            pass
        time.sleep(0.1)
    reader.join()
    lines = err[0].replace("\r", "\n").splitlines()
    last = [ln for ln in lines if "tokens/s" in ln and "examples" in ln]
    print(
        f"rc={proc.returncode} wall={time.time() - t:.1f}s peak_main={peak_main / 2**20:.0f}MiB "
        f"peak_tree={peak_tree / 2**20:.0f}MiB"
    )
    print(last[-1] if last else err[0][-2000:])


if __name__ == "__main__":
    main()
