"""Helpers of the bad-input tests (test_bad_input*.py): run a script, then check it ended in ONE line with the
right exit status (2 for bad input, 130 after CTRL-C) and no traceback.

Permission cases must not depend on who runs them: as root (we are, in CI containers too) a mode-000 folder is
still readable, so those scripts run in a child process whose capability bounding set lacks CAP_DAC_OVERRIDE,
CAP_DAC_READ_SEARCH and CAP_FOWNER (`setpriv`): root then meets file modes like anyone else. Not root: nothing to
drop. Root without setpriv: the test is skipped, saying so.

A full disk is a 1 MiB tmpfs mounted on the output folder where we may mount one (root), else the child process
runs under RLIMIT_FSIZE (a write past the limit fails with EFBIG, SIGXFSZ ignored), which fails the same writes
(MINIDIFF_TEST_NO_TMPFS=1 takes that path as root too).
"""

import contextlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FT = ["--steps", "1", "--no-prior", "--validation-images", "0", "--device", "cpu"]  # finetune, fast
DDPM = ["--batch-size", "2", "--sample-steps", "2", "--threads", "1", "--device", "cpu"]
_BAR = re.compile(r"\d+%\||\d+it \[|it/s[],]|s/it[],]")  # tqdm progress bars
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # cursor moves of nested bars


def message_lines(err):
    """The lines of stderr a person reads: each \\r-separated piece, progress bars left out."""
    pieces = [p.strip() for line in _ANSI.sub("", err).splitlines() for p in line.split("\r")]
    return [p for p in pieces if p and not _BAR.search(p)]


def assert_one_line(rc, err, pattern, status=2):
    """Exit status `status`, no traceback, and one message line (besides one-line warnings) matching `pattern`."""
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in message_lines(err) if not line.startswith("warning: ")]
    assert rc == status, f"exit status {rc}, expected {status}: {err[-2000:]}"
    assert len(lines) == 1, f"expected one line, got {lines}"
    assert lines[0].startswith("interrupted" if status == 130 else "error: "), lines[0]
    assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"
    return lines[0]


def call(main, argv):
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        return e.code


def fails(capsys, main, argv, pattern, status=2):
    """Run a script's main in this process; it must end in one line, exit status `status`. Returns its stdout."""
    rc = call(main, argv)
    out, err = capsys.readouterr()
    assert_one_line(rc, err, pattern, status)
    return out


# ------------------------------------------------------------------------------------- child processes
_RUNNER = r"""
import contextlib, importlib, io, json, sys, traceback
results = []
for module, argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = importlib.import_module(module).main(argv)
        except SystemExit as e:
            rc = e.code
        except BaseException:
            rc = "traceback"
            err.write(traceback.format_exc())
    results.append([rc, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


def run_cases(cases, prefix=(), preexec_fn=None, timeout=600):
    """[(module, argv)] run through their main() in ONE child python (started under `prefix`): [(rc, out, err)]."""
    cases = [(m, [str(a) for a in argv]) for m, argv in cases]
    r = subprocess.run(
        [*prefix, sys.executable, "-c", _RUNNER, json.dumps(cases)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=preexec_fn,
        env=_env(),
    )
    assert r.returncode == 0 and r.stdout.strip(), r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), MINIDIFF_TEST_THREADS="1", OMP_NUM_THREADS="1")


def unprivileged():
    """The command prefix that makes a child meet file permissions (module docstring), or skip."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root and setpriv (util-linux) is missing: cannot drop the permission override")
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]
    probe = subprocess.run([*prefix, "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot drop capabilities here ({probe.stderr.decode().strip()})")
    return prefix


@contextlib.contextmanager
def small_disk(folder, size=1 << 20):
    """Yields (folder, preexec_fn) where writes run out of room after ~`size` bytes (module docstring)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    may_mount = os.geteuid() == 0 and shutil.which("mount") and not os.environ.get("MINIDIFF_TEST_NO_TMPFS")
    mounted = (
        may_mount
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
        ).returncode
        == 0
    )
    if mounted:
        try:
            yield folder, None
        finally:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)
        return

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 4, size // 4))  # per file: fails the larger writes

    yield folder, limit


def interrupt_when(argv, ready, timeout=300):
    """Start `python argv...`, wait until ready() (or fail if it ends first), send SIGINT: (rc, stdout, stderr)."""
    p = subprocess.Popen(
        [sys.executable, *map(str, argv)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + timeout
    try:
        while not ready():
            if p.poll() is not None or time.time() > deadline:
                out, err = p.communicate()
                pytest.fail(f"ended (or timed out) before the moment to interrupt came: {p.returncode} {err[-2000:]}")
            time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, out, err


def loss_rows(out):
    path = Path(out) / "loss.csv"
    return len(path.read_text().splitlines()) - 1 if path.is_file() else 0
