"""The README's commands, run as written, in a temporary copy of the checkout with no virtual environment activated.

Every command in a ```bash block is either run here or listed in NOT_RUN with the reason and where it is covered,
so a README command that changes, or a new one, fails this test until it is run or explained. Blocks fenced as
```sh are configuration examples for the user's own machine (real data, tokens, downloads) and are not commands of
this checkout.

The copy shares the checkout's .venv (installing from scratch is what .ci/run does before the suite, and takes
minutes); PYTHONPATH points the venv's console scripts at the copy's code, so the copy's home is the copy's own.
"""

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from paper_assets.processes import start_bound

from .conftest import REPO, stop_process_group
from .test_demo import check_the_default_demo

NOT_RUN = {
    "make test": "this is the suite itself; CI (.ci/run) runs exactly it",
    "make bench": "the benchmark takes ~10 minutes on 2 cores; `paper-assets bench` is run by test_cli.py",
}
UI_PORT = 3000


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            command = line.split("#", 1)[0].strip()
            if command:
                commands.append(command)
    return commands


def test_every_readme_command_is_run_or_explained():
    commands = readme_commands()
    assert "make demo" in commands and "make ui" in commands
    unknown = [c for c in commands if c not in NOT_RUN and c not in RUN]
    assert not unknown, f"README commands this test neither runs nor explains: {unknown}"


@pytest.fixture(scope="module")
def checkout_copy(tmp_path_factory):
    venv = REPO / ".venv"
    if not (venv / ".installed").exists():
        pytest.skip("the README commands run against the checkout's .venv (make setup)")
    copy = tmp_path_factory.mktemp("readme") / "paper_assets"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    for name in listed:
        source = REPO / name
        if source.is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / name)
    (copy / ".venv").symlink_to(venv)
    installed = (venv / ".installed").stat().st_mtime
    for name in ("pyproject.toml", "setup.py"):  # `make setup` is up to date: the venv was installed after them
        os.utime(copy / name, (installed - 60, installed - 60))
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if Path(p).resolve() != (venv / "bin").resolve())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PAPER_ASSETS_", "DAGSTER_", "VIRTUAL_ENV"))}
    env.update(PATH=path, PYTHONPATH=str(copy))
    return copy, env


def run(command: str, copy: Path, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=copy, env=env, capture_output=True, text=True,
                          timeout=timeout)


def check_make_demo(copy: Path, env: dict) -> None:
    done = run("make demo", copy, env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "done:" in done.stdout and "none are activated" not in done.stdout + done.stderr
    assert (copy / ".paper_assets" / "embeddings").is_dir()  # the copy's own home, not the checkout's
    check_the_default_demo(done.stdout, copy / ".paper_assets",
                           lambda args: run(".venv/bin/paper-assets " + " ".join(args), copy, env, timeout=120))


def check_make_ui(copy: Path, env: dict) -> None:
    with socket_free(UI_PORT):
        server = start_bound(["bash", "-c", "make ui"], cwd=copy, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.time() + 180
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{UI_PORT}/server_info", timeout=5) as answer:
                        assert json.loads(answer.read())
                    break
                except OSError as err:
                    if server.poll() is not None or time.time() > deadline:
                        output = server.stdout.read() if server.poll() is not None else ""
                        raise AssertionError(f"`make ui` did not answer on port {UI_PORT}: {output[-3000:]}") from err
                    time.sleep(1)
        finally:
            stop_process_group(server)


def check_update(copy: Path, env: dict) -> None:
    done = run(".venv/bin/paper-assets update --publish", copy, env)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["ranges_changed"] == 0 and summary["rows_embedded"] == 0  # the demo left the home current


class socket_free:
    def __init__(self, port: int):
        self.port = port

    def __enter__(self):
        import socket

        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                pytest.fail(f"port {self.port} is taken: `make ui` serves there")
        return self

    def __exit__(self, *exc):
        return False


RUN = {
    "make demo": check_make_demo,
    "make ui": check_make_ui,
    ".venv/bin/paper-assets update --publish": check_update,
}


def test_readme_commands_as_written(checkout_copy):
    copy, env = checkout_copy
    commands = readme_commands()
    for command in commands:  # in README order: the demo first, then the UI on its home, then an update
        if command in RUN:
            RUN[command](copy, env)
