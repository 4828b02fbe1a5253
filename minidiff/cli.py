"""The command line, the same in every script: usage errors in one line, the flags the trainers share, range checks,
and one shape for every `main()`:

    def main(argv=None):
        args = build_parser().parse_args(argv)
        return cli.exit_code(run, args)       # 0, or 2 with one `error: ...` line for a MinidiffError

`python script.py` ends with `sys.exit(main())`; tests call `main([...])` in-process and read the status.
"""
import argparse
import sys

from .errors import MinidiffError


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit status 2, like every other user error."""

    def error(self, message):
        command = self.prog if self.prog.startswith("python") else f"python {self.prog}"  # a script, or `python -m`
        print(f"error: {message} (see {command} --help)", file=sys.stderr)
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
