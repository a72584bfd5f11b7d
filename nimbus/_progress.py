"""Progress bars for long work: tqdm.auto when verbose, a silent stand-in otherwise."""
from __future__ import annotations

import contextlib


class _Silent:
    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass


@contextlib.contextmanager
def progress_bar(total, desc, verbose):
    """Context manager yielding an object with ``update(n=1)`` and ``set_postfix_str``."""
    if not verbose:
        yield _Silent()
        return
    from tqdm.auto import tqdm
    bar = tqdm(total=total, desc=desc, leave=False)
    try:
        yield bar
    finally:
        bar.close()
