"""Times the first touch of fresh anonymous memory, to tell a guest's own page zeroing from
host refaults (virtio-balloon free page reporting) when reading page-zeroing shares in short
`perf record` profiles.

    python3 scripts/first_touch.py [PAUSE_S]

Maps 512 MiB with MADV_HUGEPAGE three times, writes one byte per 4 KiB page and prints the
rate; PAUSE_S seconds pass between rounds (freed pages get reported to the host meanwhile).
"""
import mmap
import sys
import time

SIZE = 512 << 20
pause = float(sys.argv[1]) if len(sys.argv) > 1 else 0.0
for rnd in range(3):
    m = mmap.mmap(-1, SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_HUGEPAGE)
    t0 = time.perf_counter()
    for off in range(0, SIZE, 4096):
        m[off] = 1
    dt = time.perf_counter() - t0
    print(f"round {rnd}: first touch of 512 MiB in {dt:.3f} s = {SIZE / dt / 1e9:.2f} GB/s")
    m.close()
    time.sleep(pause)
