"""Running code a model wrote, never in our own process: a bubblewrap sandbox per run.

    outcome = run_python(code, timeout=10.0)   # Outcome(status, returncode, stdout, stderr)

Each run gets a fresh workspace folder (its only writable place, also its HOME and TMPDIR)
and a sandbox made by bubblewrap (`bwrap`, Debian/Ubuntu: `apt-get install bubblewrap`),
which needs no daemon:
- a new network namespace (no network: only its own loopback), and new PID, IPC and UTS
  namespaces; the sandbox dies with the process that started it;
- a file system of its own: /usr, /etc and the Python installation read-only, /dev and /proc,
  the workspace read-write at /workspace, nothing else (no home folders, no project files);
- an unprivileged user (nobody, 65534) with no capabilities and no way to gain any;
- limits (setrlimit, through util-linux's prlimit): address space, CPU seconds, processes,
  file size, open files;
- a wall-clock timeout, past which the whole sandbox is killed;
- stdout and stderr go to files outside the workspace, capped by the file-size limit, and are
  read back at most `max_output` characters each.

Without bwrap, or where the kernel refuses its namespaces, `SandboxUnavailable` says what to
install or enable. `unsafe=True` runs the code in a plain subprocess with the same limits and
timeout but no isolation: only for code one trusts.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

NOBODY = 65534
WORKSPACE = "/workspace"  # where the run's folder appears inside the sandbox
INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: sudo apt-get install bubblewrap; "
                "Fedora: sudo dnf install bubblewrap)")


class SandboxUnavailable(RuntimeError):
    """No working sandbox on this machine; the message says what to install or enable."""


@dataclasses.dataclass(frozen=True)
class Limits:
    memory_bytes: int = 2 << 30  # address space
    cpu_seconds: int = 20
    processes: int = 64
    file_bytes: int = 16 << 20
    open_files: int = 256


@dataclasses.dataclass
class Outcome:
    status: str  # "ok" (exit 0), "error" (another exit or a signal), "timeout"
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "ok"


def _bwrap() -> str:
    path = shutil.which("bwrap")
    if path is None:
        raise SandboxUnavailable(f"no sandbox: bubblewrap (bwrap) is not installed; "
                                 f"{INSTALL_HINT}")
    return path


def _python_roots() -> list[str]:
    """The folders the interpreter runs from (the installation, and a virtual environment)."""
    roots = []
    for p in (sys.base_prefix, sys.prefix, os.path.dirname(os.path.realpath(sys.executable))):
        p = os.path.realpath(p)
        if not any(p == r or p.startswith(r + os.sep) for r in roots):
            roots.append(p)
    return roots


def _system_binds() -> list[str]:
    args = []
    for top in ("/usr", "/etc"):
        if os.path.isdir(top):
            args += ["--ro-bind", top, top]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    return args


def _command(workspace: pathlib.Path, argv: list[str]) -> list[str]:
    root = os.geteuid() == 0
    cmd = [_bwrap(), "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
           "--unshare-cgroup-try", "--die-with-parent", "--new-session",
           "--proc", "/proc", "--dev", "/dev", *_system_binds()]
    made = set()
    for r in _python_roots():
        if r.startswith(("/usr/", "/etc/")):
            continue
        for parent in reversed(pathlib.PurePosixPath(r).parents[:-1]):
            if parent not in made:  # traversable by nobody (bwrap would make them 0700)
                cmd += ["--perms", "0755", "--dir", str(parent)]
                made.add(parent)
        cmd += ["--ro-bind", r, r]
    cmd += ["--bind", str(workspace), WORKSPACE, "--chdir", WORKSPACE, "--clearenv",
            "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin", "--setenv", "HOME", WORKSPACE,
            "--setenv", "TMPDIR", WORKSPACE, "--setenv", "LANG", "C.UTF-8",
            "--setenv", "PYTHONDONTWRITEBYTECODE", "1"]
    if root:  # no user namespace: the real uid becomes nobody inside, all capabilities go
        cmd += ["--", "/usr/bin/setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"]
    else:  # an unprivileged user namespace, mapped to the caller's own uid
        cmd += ["--unshare-user", "--uid", str(NOBODY), "--gid", str(NOBODY),
                "--cap-drop", "ALL", "--"]
    return cmd + argv


def _limited(limits: Limits, cmd: list[str]) -> list[str]:
    """`cmd` under util-linux's prlimit (set in the new process, not by a preexec_fn: forking
    a multi-threaded process such as JAX's with Python code to run in the child can
    deadlock)."""
    return [_prlimit(), f"--as={limits.memory_bytes}", f"--cpu={limits.cpu_seconds}",
            f"--nproc={limits.processes}", f"--fsize={limits.file_bytes}",
            f"--nofile={limits.open_files}", "--core=0", "--", *cmd]


def _prlimit() -> str:
    path = shutil.which("prlimit")
    if path is None:
        raise SandboxUnavailable("no sandbox: util-linux's prlimit is not installed "
                                 "(Debian/Ubuntu: apt-get install util-linux)")
    return path


_CHECKED: list[bool] = []


def check_sandbox() -> None:
    """Raise SandboxUnavailable unless a sandbox can be made here (checked once)."""
    if _CHECKED:
        return
    with tempfile.TemporaryDirectory(prefix="qwen_jax_sandbox_check_") as d:
        workspace = pathlib.Path(d)
        if os.geteuid() == 0:
            os.chown(workspace, NOBODY, NOBODY)
        try:
            done = subprocess.run(_command(workspace, [sys.executable, "-c", "print('ok')"]),
                                  capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SandboxUnavailable(f"no sandbox: bwrap did not run ({e}); {INSTALL_HINT}") \
                from None
    if done.returncode != 0 or done.stdout.strip() != "ok":
        detail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SandboxUnavailable(
            f"no sandbox: bwrap could not start one here ({detail}); it needs unprivileged "
            "user namespaces (sysctl kernel.unprivileged_userns_clone=1) or root")
    _CHECKED.append(True)


def run_python(code: str, *, timeout: float = 10.0, limits: Limits = Limits(),
               max_output: int = 4096, unsafe: bool = False) -> Outcome:
    """Run `code` as a Python program in a fresh sandbox (see the module docstring)."""
    if not unsafe:
        check_sandbox()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="qwen_jax_run_") as d:
        top = pathlib.Path(d)
        workspace, logs = top / "workspace", top / "logs"
        workspace.mkdir()
        logs.mkdir()
        (workspace / "main.py").write_text(code)
        argv = [sys.executable, "-I", "main.py"]
        if not unsafe and os.geteuid() == 0:
            os.chown(workspace, NOBODY, NOBODY)
            os.chown(workspace / "main.py", NOBODY, NOBODY)
        cmd = _limited(limits, argv if unsafe else _command(workspace, argv))
        with open(logs / "stdout", "wb") as out, open(logs / "stderr", "wb") as err:
            proc = subprocess.Popen(cmd, cwd=workspace, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=err, start_new_session=True,
                                    env=None if not unsafe else _plain_env(workspace))
            try:
                returncode = proc.wait(timeout=timeout)
                status = "ok" if returncode == 0 else "error"
            except subprocess.TimeoutExpired:
                _kill(proc)
                returncode, status = None, "timeout"
            finally:
                if proc.poll() is None:
                    _kill(proc)
        stdout, stderr = (_read(logs / name, max_output) for name in ("stdout", "stderr"))
    return Outcome(status, returncode, stdout, stderr, time.monotonic() - started)


def _plain_env(workspace: pathlib.Path) -> dict:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(workspace),
            "TMPDIR": str(workspace), "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _read(path: pathlib.Path, limit: int) -> str:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    text = data[:limit].decode("utf-8", errors="replace")
    return text + ("\n[... output cut]" if len(data) > limit else "")


def install_command() -> list[str] | None:
    """The command that installs bubblewrap here (apt-get on Debian/Ubuntu), or None."""
    if shutil.which("apt-get") is None:
        return None
    prefix = [] if os.geteuid() == 0 else ["sudo"]
    return prefix + ["apt-get", "install", "-y", "-q", "bubblewrap"]


def _main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m qwen_jax.sandbox",
                                description="Check (or install, then check) the sandbox that "
                                "runs model-written code.")
    p.add_argument("--install", action="store_true",
                   help="install bubblewrap first if it is missing (apt-get; sudo unless root)")
    args = p.parse_args(argv)
    if args.install and shutil.which("bwrap") is None:
        cmd = install_command()
        if cmd is None:
            print(f"error: bubblewrap is missing and apt-get is not here: {INSTALL_HINT}",
                  file=sys.stderr)
            return 1
        print("installing bubblewrap: " + " ".join(cmd), file=sys.stderr)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
            print(f"error: {' '.join(cmd)} failed; {INSTALL_HINT}", file=sys.stderr)
            return 1
    try:
        check_sandbox()
    except SandboxUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"sandbox ready: {shutil.which('bwrap')}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
