"""The command line, the same in every script: usage errors in one line, the flags the trainers share, range checks,
and one shape for every `main()`:

    def main(argv=None):
        argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
        args = build_parser().parse_args(argv)
        return cli.exit_code(run, args)       # 0; 2 with one `error: ...` line; 130 after CTRL-C

`run(args)` is the script's body: checks, then the work (finetune.py: a config, then one call).
`python script.py` ends with `sys.exit(main())`; tests call `main([...])` in-process and read the status.

Every parser also takes the spellings of diffusers' and kohya's training scripts, so a command line copied from
their READMEs runs: `--snake_case` is read as `--snake-case` wherever this script has that flag, and the flags we
name differently are translated by DIFFUSERS_FLAGS (flag -> the tokens it stands for; [] = our default already).
"""

import argparse
import errno
import math
import re
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from .errors import MinidiffError

INTERRUPTED = 130  # exit status after CTRL-C (128 + SIGINT), as shells report it
# OS errors a user causes (full disk, read-only or missing folder, permissions): one line, never a traceback
USER_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EFBIG,
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.ENOENT,
}
# a value such as -1e-4, -.5 or -inf after a flag is a value, not a flag (argparse alone knows only -1 and -0.5)
NEGATIVE_NUMBER = re.compile(r"^-(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^-(?:inf|infinity|nan)$", re.IGNORECASE)


def finite_float(text):
    """argparse type of every float flag: a finite number (nan and inf are refused where they are typed)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


# diffusers' train_dreambooth_lora_sdxl.py flag -> ours, where the name (not only the _ / - spelling) differs
DIFFUSERS_FLAGS = {
    "--pretrained_model_name_or_path": ["--model"],
    "--pretrained_vae_model_name_or_path": ["--vae"],
    "--instance_data_dir": ["--instance-dir"],
    "--class_data_dir": ["--class-dir"],
    "--with_prior_preservation": [],  # prior preservation is on unless --no-prior
    "--prior_loss_weight": ["--prior-weight"],
    "--sample_batch_size": ["--class-batch-size"],
    "--output_dir": ["--out"],
    "--train_batch_size": ["--batch-size"],
    "--max_train_steps": ["--steps"],
    "--learning_rate": ["--lr"],
    "--gradient_accumulation_steps": ["--grad-accum"],
    "--lr_scheduler": ["--lr-schedule"],
    "--lr_warmup_steps": ["--warmup"],
    "--snr_gamma": ["--min-snr-gamma"],
    "--checkpointing_steps": ["--save-every"],
    "--resume_from_checkpoint": ["--resume"],
    "--center_crop": ["--fit", "crop"],
}


def translate_flags(argv, known):
    """argv with diffusers' spellings replaced by ours (see the module docstring); `known`: this parser's flags."""
    out = []
    for token in argv:
        flag, eq, value = token.partition("=")
        if not flag.startswith("--") or flag in known:
            out.append(token)
            continue
        if flag in DIFFUSERS_FLAGS and (not DIFFUSERS_FLAGS[flag] or DIFFUSERS_FLAGS[flag][0] in known):
            new = DIFFUSERS_FLAGS[flag]
        elif flag.replace("_", "-") in known:
            new = [flag.replace("_", "-")]
        else:
            new = [flag]
        out += [new[0] + eq + value, *new[1:]] if new else []
    return out


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit status 2, like every other user error. Float flags take
    finite numbers only, and `--lr -1e-4` reads -1e-4 as the flag's value (then refused by the range check).
    It reads diffusers' flag spellings too (translate_flags)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER
        self.register("type", float, finite_float)  # type=float means a finite float, in every argument group

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(translate_flags(args, self._option_string_actions), namespace)

    def error(self, message):
        command = self.prog if self.prog.startswith("python") else f"python {self.prog}"  # a script, or `python -m`
        print(f"error: {message} (see {command} --help)", file=sys.stderr)
        raise SystemExit(2)

    def add_run_flags(self, out, samples):
        """The flags both from-scratch trainers share: seed, device, threads, output folder, resume, save cadence."""
        a = self.add_argument
        a("--seed", type=int, default=0)
        a("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
        a(
            "--threads",
            type=int,
            default=1,
            help="CPU threads for torch (default 1: the same result whatever the "
            "load; more are faster on an idle machine and change the last bits, and a thread that must wait for a "
            "busy core makes every step 4-10x slower when other jobs share the machine)",
        )
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
    """Run a script's body: 0 when it finishes; 2 with one `error: ...` line on stderr for a MinidiffError or an OS
    error the user can fix (full disk, permissions); 130 with one `interrupted ...` line after CTRL-C (a training
    loop writes its checkpoint first, minidiff/train/interrupt.py). torch's CPU thread count is restored after, as a
    script's main() may run in-process (tests) and `--threads` sets it."""
    threads = torch.get_num_threads()
    try:
        return _run(fn, *args, **kwargs)
    finally:
        torch.set_num_threads(threads)


def _run(fn, *args, **kwargs) -> int:
    try:
        fn(*args, **kwargs)
    except MinidiffError as e:
        _close_bars()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        _close_bars()
        print("interrupted" + (f": {e}" if str(e) else " (files written so far are intact)"), file=sys.stderr)
        return INTERRUPTED
    except OSError as e:
        if e.errno not in USER_ERRNOS:
            raise
        _close_bars()
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or e}{where} (files written before are intact)", file=sys.stderr)
        return 2
    return 0


def _close_bars():
    """End any progress bar still drawing, so the one-line message starts on a line of its own."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def read_prompts(args) -> list[str]:
    """The --prompt values (repeatable) followed by the lines of a --prompts file (blank lines and '#' comments
    skipped); empty when neither was given. A file that cannot be read is a MinidiffError."""
    prompts = list(args.prompt or [])
    if args.prompts:
        try:
            lines = Path(args.prompts).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise MinidiffError(f"cannot read --prompts {args.prompts}: {e}") from None
        prompts += [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]
    return prompts
