"""Resident memory of this process: now, at its peak, and resetting the peak (for fresh-process benchmarks)."""
from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

__all__ = ["current_rss_bytes", "peak_rss_bytes", "reset_peak_rss"]


def current_rss_bytes() -> int:
    """Resident memory now (Linux ``/proc``; elsewhere the peak so far, the best available)."""
    statm = Path("/proc/self/statm")
    if statm.exists():
        return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far."""
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True
