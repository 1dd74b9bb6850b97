"""Progress that reads well in a terminal and in a log.

On a terminal, one tqdm bar; messages written through ``write`` (and the scripts' log
handler, ``ldm.cli``) appear above it instead of being glued onto it. When stderr is not a
terminal (a log file, a pipe, CI), plain lines at every tenth of the way and at the end:
no carriage returns, no cursor-movement escapes.
"""
import sys
import time


def progress(total, desc, unit="step", disable=False, initial=0):
    """A bar for ``total`` units of work, ``initial`` of them done before it starts (not
    counted in its rate): ``update(n)``, ``set_postfix_str(s)``, ``close()``, usable as a
    context manager."""
    if disable or total <= 0:
        return NullProgress()
    stream = sys.stderr
    if _is_terminal(stream):
        from tqdm import tqdm
        sized = _width(stream) > 0  # a terminal that reports no width gets 80 columns
        return tqdm(total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=sized,
                    ncols=None if sized else 80, nrows=None if sized else 24,
                    initial=initial)
    return LogProgress(total, desc, unit, stream, initial)


def write(message):
    """Print a message to stderr above any bar."""
    from tqdm import tqdm
    tqdm.write(message, file=sys.stderr)


def _is_terminal(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _width(stream):
    import os
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 0


class NullProgress:
    n = 0

    def update(self, n=1):
        self.n += n

    def set_postfix_str(self, s="", refresh=True):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LogProgress(NullProgress):
    """One line per tenth of the work: ``sampling: 40/100 steps (40%), 12.3 s, 18 s left``."""

    def __init__(self, total, desc, unit, stream, initial=0):
        self.total, self.desc, self.unit, self.stream = total, desc, unit, stream
        self.start, self.postfix, self.closed = time.monotonic(), "", False
        self.n = self.initial = initial
        self.tenths = min(10, initial * 10 // total)

    def update(self, n=1):
        self.n += n
        tenths = min(10, self.n * 10 // self.total)
        if tenths > self.tenths:
            self.tenths = tenths
            self._line()

    def set_postfix_str(self, s="", refresh=True):
        self.postfix = s

    def _line(self):
        elapsed = time.monotonic() - self.start
        ran = self.n - self.initial
        left = elapsed / ran * (self.total - self.n) if ran > 0 else 0
        units = self.unit + ("s" if self.total != 1 else "")
        text = (f"{self.desc}: {self.n}/{self.total} {units} ({100 * self.n // self.total}%), "
                f"{_duration(elapsed)}" + (f", {_duration(left)} left" if self.n < self.total
                                            else "") + (f", {self.postfix}" if self.postfix else ""))
        # one write with its newline, so that a line written from another thread (the
        # interrupt watchdog's) never lands in the middle of it
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self):
        if not self.closed and self.initial < self.n and self.tenths < 10:
            self._line()  # stopped early: say where
        self.closed = True


def _duration(seconds):
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d} min" if m < 60 else f"{m // 60}:{m % 60:02d}:{s:02d} h"
