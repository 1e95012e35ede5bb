"""Source text shared by the benchmarks' child programs (each measured path runs in its own process)."""

# peak_rss_gb(): the child's own peak RSS. VmHWM belongs to the program's memory map; ru_maxrss is not its own:
# Linux carries the forking parent's high-water mark across exec.
PEAK_RSS = r'''
def peak_rss_gb():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024 ** 2
'''
