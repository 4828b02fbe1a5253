"""The errors a user can cause. Each carries one line that says what was expected.

Scripts catch `MinidiffError`, print its message and exit with status 2, so a user never sees a traceback from deep
inside torch for a missing file, an empty folder or a wrong key layout.
"""
import argparse
import sys


class MinidiffError(Exception):
    """Base class: a problem with the user's input, explained in one line."""


class DataError(MinidiffError, ValueError):
    """An image folder, image file or caption that cannot be used."""


class CheckpointError(MinidiffError, ValueError):
    """A weights file or folder that is missing, unreadable or of another layout or architecture."""


class LoRAError(MinidiffError, ValueError):
    """A LoRA file whose keys or shapes do not fit the model, or bad LoRA settings."""


class TrainingError(MinidiffError, RuntimeError):
    """Training cannot go on: NaN loss, unsupported GPU, nothing to resume from."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit status 2, like every other user error."""

    def error(self, message):
        print(f"error: {message} (see python {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)

    def add_run_flags(self, out, samples):
        """The flags both from-scratch trainers share: seed, device, threads, output folder, resume, save cadence."""
        a = self.add_argument
        a("--seed", type=int, default=0)
        a("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
        a("--threads", type=int, default=1, help="CPU threads for torch (default 1: the same result whatever the "
          "load; more are faster on an idle machine and change the last bits, and a thread that must wait for a "
          "busy core makes every step 4-10x slower when other jobs share the machine)")
        a("--out", default=out)
        a("--resume", default=None, help="a checkpoint file, an output folder, or 'latest' (in --out)")
        a("--save-every", type=int, default=None, help="checkpoint every N steps (and at the end)")
        a("--sample-every", type=int, default=None, help=f"{samples} every N steps (0: only grid.png)")


def check_counts(args, positive=(), non_negative=()):
    """MinidiffError naming the flag when an integer flag is out of range (`positive`: > 0, `non_negative`: >= 0)."""
    for flag in positive:
        if getattr(args, flag) <= 0:
            raise MinidiffError(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")
    for flag in non_negative:
        if getattr(args, flag) < 0:
            raise MinidiffError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")


def exit_code(fn, *args, **kwargs) -> int:
    """Run a script's body: 0 when it finishes, 2 with one `error: ...` line on stderr for a MinidiffError."""
    try:
        fn(*args, **kwargs)
    except MinidiffError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
