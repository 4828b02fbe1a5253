"""CTRL-C in a training loop: finish the step, write a checkpoint, then stop with one line and exit status 130.

    for step in interrupt.steps(range(start + 1, steps + 1), on_stop=save_checkpoint):
        ...one whole optimizer step...     # CTRL-C here: save_checkpoint(step) after it, then interrupt.Stopped

A KeyboardInterrupt raised where SIGINT happens to land could leave half of the weights updated by
optimizer.step(); so inside `Deferred` the first CTRL-C only sets `requested`, and the loop stops at the end of
the step, after a checkpoint identical to the one --save-every would have written there (`--resume latest`
continues bit for bit). A second CTRL-C stops at once (the checkpoints written before are intact: every save is
atomic). Outside the main thread (signals cannot be caught there) CTRL-C behaves as usual. The scripts' exit_code
(minidiff/cli.py) turns Stopped, like any KeyboardInterrupt, into one line and exit status 130.
"""

import signal
import threading


class Stopped(KeyboardInterrupt):
    """Training stopped by CTRL-C after step `step`; its checkpoint is `path`."""

    def __init__(self, step, path):
        super().__init__(f"stopped after step {step}; checkpoint {path} (continue with --resume latest)")
        self.step, self.path = step, path


class Deferred:
    """Context manager: the first SIGINT sets `requested` instead of raising; the second raises KeyboardInterrupt."""

    def __init__(self):
        self.requested, self._previous = False, None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def steps(iterable, on_stop, agree=None):
    """Yield the steps of a training loop. When CTRL-C was pressed during a step and another step follows, call
    on_stop(step) (it writes a checkpoint and returns its path) and raise Stopped instead of going on; after the
    last step the run simply finishes. agree(requested) -> bool makes the processes of a data-parallel run agree
    (any of them asked), so all stop after the same step."""
    with Deferred() as stop:
        done = None
        for step in iterable:
            if done is not None and (agree(stop.requested) if agree is not None else stop.requested):
                raise Stopped(done, on_stop(done))
            yield step
            done = step
