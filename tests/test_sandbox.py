"""qwen_jax.sandbox: model-written code runs in a bubblewrap sandbox. Code that loops forever,
allocates 4 GB, opens a socket, writes outside its folder or forks without end fails cleanly,
and the caller carries on; without bwrap nothing runs and the message says what to install."""

import os
import socket
import time

import pytest

from qwen_jax import sandbox
from qwen_jax.sandbox import Limits, SandboxUnavailable, run_python

import runs


def test_a_plain_program_runs_as_nobody_in_its_own_folder():
    out = run_python("import os, sys\nprint(os.getuid(), os.getcwd())\n"
                     "print('err', file=sys.stderr)\nopen('note.txt', 'w').write('kept')\n"
                     "print(open('note.txt').read())")
    assert out.passed and out.returncode == 0, out
    assert out.stdout.split() == ["65534", sandbox.WORKSPACE, "kept"]
    assert out.stderr == "err\n"


def test_a_loop_forever_is_killed_at_the_timeout():
    started = time.monotonic()
    out = run_python("while True:\n    pass", timeout=2)
    assert out.status == "timeout" and out.returncode is None
    assert time.monotonic() - started < 10


def test_four_gigabytes_are_refused():
    out = run_python("x = bytearray(4 * 2**30)\nprint('allocated')",
                     limits=Limits(memory_bytes=1 << 30))
    assert out.status == "error" and "MemoryError" in out.stderr
    assert "allocated" not in out.stdout


def test_no_network_not_even_this_machine():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        out = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), "
                         "timeout=3)\nprint('connected')")
    assert out.status == "error" and "connected" not in out.stdout
    assert "ConnectionRefusedError" in out.stderr or "OSError" in out.stderr, out.stderr


def test_nothing_outside_the_folder_can_be_written_or_read(tmp_path):
    target = tmp_path / "escape.txt"
    for path in (target, "/escape.txt", "/tmp/escape.txt", "/usr/escape.txt"):
        out = run_python(f"open({str(path)!r}, 'w').write('x')\nprint('wrote')")
        assert out.status == "error" and "wrote" not in out.stdout, (path, out)
    assert not target.exists() and not os.path.exists("/tmp/escape.txt")
    out = run_python(f"import os\nprint(os.path.exists({str(runs.ROOT / 'train.py')!r}))")
    assert out.stdout.strip() == "False"  # the project (and any home folder) is not there


def test_processes_output_and_files_are_limited():
    fork = ("import os, time\nfor _ in range(200):\n    if os.fork() == 0:\n"
            "        time.sleep(3)\n        os._exit(0)\nprint('forked 200')")
    out = run_python(fork, limits=Limits(processes=16))
    assert out.status == "error" and "forked 200" not in out.stdout
    out = run_python("print('x' * 100000)", max_output=1000)
    assert out.passed and len(out.stdout) < 1100 and out.stdout.endswith("[... output cut]")
    out = run_python("open('big', 'wb').write(b'0' * (64 << 20))",
                     limits=Limits(file_bytes=1 << 20))
    assert out.status == "error"


def test_without_bwrap_nothing_runs_and_the_message_says_what_to_install(monkeypatch):
    which = sandbox.shutil.which
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None if name == "bwrap" else
                        which(name))
    monkeypatch.setattr(sandbox, "_CHECKED", [])
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
        run_python("print(1)")
    unsafe = run_python("print(1)", unsafe=True)  # only when asked for by name
    assert unsafe.passed and unsafe.stdout == "1\n"


def test_the_check_command():
    result = runs.cli("--install", module="qwen_jax.sandbox", timeout=120)
    assert result.returncode == 0 and "sandbox ready" in result.stdout, result.stderr
