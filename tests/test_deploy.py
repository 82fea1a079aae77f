"""The deployment files as shipped: the systemd unit agrees with the README's steps and passes
``systemd-analyze verify``; the Dockerfile's pip line, CMD and HEALTHCHECK work on this machine
(CI has no container engine, so the image itself is never built here)."""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from server.embedded_redis import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT = os.path.join(ROOT, "deploy", "wechat-token-server.service")
GOOD_SECRET = "a-long-random-request-secret-42"


def unit() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read(UNIT, encoding="utf-8")
    return parser["Service"]


def readme_block(heading: str) -> list[str]:
    """The lines of the first ```bash block after ``heading``, comments cut."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split(f"\n{heading}\n", 1)[1]
    block = section.split("```bash\n", 1)[1].split("\n```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


def the_line(lines: list[str], start: str) -> list[str]:
    found = [shlex.split(line) for line in lines if line.startswith(start)]
    assert len(found) == 1, f"README: one line starting {start!r}, found {found}"
    return found[0]


def test_the_unit_matches_the_readmes_systemd_steps() -> None:
    svc = unit()
    steps = readme_block("### Running it with systemd")
    useradd = the_line(steps, "useradd ")
    user, home = useradd[-1], useradd[useradd.index("--home") + 1]
    assert "--system" in useradd and useradd[useradd.index("--shell") + 1] == "/usr/sbin/nologin"
    assert svc["User"] == svc["Group"] == user
    install_dir = svc["WorkingDirectory"]
    assert home == install_dir

    venv = the_line(steps, "python3 -m venv ")[-1]
    assert venv.startswith(install_dir + "/")
    pip = the_line(steps, f"{venv}/bin/pip install ")
    assert pip[-2:] == ["-r", f"{install_dir}/requirements-runtime.txt"]
    assert os.path.exists(os.path.join(ROOT, "requirements-runtime.txt"))

    exec_start = shlex.split(svc["ExecStart"])
    assert exec_start[:2] == [f"{venv}/bin/python", f"{install_dir}/token_server.py"]  # the venv's python, not /usr/bin/python3
    config = exec_start[exec_start.index("--config") + 1]

    install_config = the_line(steps, "install -m 640 ")
    assert install_config[-1] == config and install_config[install_config.index("-g") + 1] == user
    install_env = the_line(steps, "install -m 600 ")
    assert install_env[-1] == svc["EnvironmentFile"] and install_env[install_env.index("-g") + 1] == "root"
    conf_dir = the_line(steps, "install -d -m 750 ")
    assert conf_dir[-1] == os.path.dirname(config) and conf_dir[conf_dir.index("-g") + 1] == user

    # The --check line runs the unit's own command, as its user.
    check = the_line(steps, "runuser ")
    assert check[:4] == ["runuser", "-u", user, "--"] and check[4:] == exec_start + ["--check"]
    assert the_line(steps, f"install -m 644 {install_dir}/deploy/")[-2:] == [
        f"{install_dir}/deploy/wechat-token-server.service", "/etc/systemd/system/"]

    # What the issue asked of the unit itself.
    assert svc["RestartPreventExitStatus"] == "2" and svc["Restart"] == "on-failure"
    assert svc["LimitNOFILE"] == "65536"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert svc[key] == "yes"
    assert svc["ProtectSystem"] == "strict"
    assert "ReadWritePaths" not in svc  # StateDirectory= instead: a directory systemd creates
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert f"/var/lib/{svc['StateDirectory']}" in readme and f"/var/log/{svc['LogsDirectory']}" in readme


def test_the_readmes_layout_runs_the_check(tmp_path) -> None:
    """The unit's ExecStart, moved under a temporary root: a venv's python runs token_server.py
    from the install directory and checks the installed example config (its appid edited)."""
    svc = unit()
    install_dir = tmp_path / "opt"
    shutil.copytree(ROOT, install_dir, ignore=shutil.ignore_patterns(".git", "tests", "bench", "*.whl", "__pycache__"))
    # --system-site-packages: the packages are this machine's, the venv layout is the README's.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(install_dir / "venv")], check=True, timeout=60)
    config = tmp_path / "etc" / "config.yaml"
    config.parent.mkdir()
    text = open(os.path.join(ROOT, "config.example.yaml"), encoding="utf-8").read().replace("appid: wx123,", "appid: wx0a1b2c3d4e5f6a7b,")
    config.write_text(text)
    config.chmod(0o640)
    command = [part.replace(svc["WorkingDirectory"], str(install_dir)) for part in shlex.split(svc["ExecStart"])]
    command[command.index("--config") + 1] = str(config)
    env = {"PATH": os.environ["PATH"], "TOKEN_SERVER_SECRET": GOOD_SECRET, "WECHAT_APPSECRET": "f" * 32}
    result = subprocess.run([*command, "--check"], cwd=str(install_dir), capture_output=True, text=True, timeout=30, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("config OK: 2 sources (access_token, ticket)")
    assert "readable by other users" not in result.stderr  # 640: group, not others


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is absent (Debian's systemd package); the unit is still checked against the README")
def test_systemd_analyze_verify(tmp_path) -> None:
    # verify refuses an ExecStart binary that does not exist: the venv's python is this one here.
    svc = unit()
    text = open(UNIT, encoding="utf-8").read().replace(shlex.split(svc["ExecStart"])[0], sys.executable)
    path = tmp_path / "wechat-token-server.service"
    path.write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # An unknown or misspelt key is only a warning to systemd: "Unknown key ..., ignoring".
    assert str(path) not in output, output


# --- the Dockerfile's steps on this machine ------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments), continuation lines joined, comments dropped."""
    text = open(os.path.join(ROOT, "Dockerfile"), encoding="utf-8").read()
    text = re.sub(r"\\\n\s*", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def instruction(name: str) -> list[str]:
    return [args for instr, args in dockerfile() if instr == name]


def test_the_dockerfile_is_slim_non_root_and_copies_what_exists() -> None:
    (base,) = instruction("FROM")
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base)
    (user,) = instruction("USER")
    assert not user.startswith(("root", "0"))
    for args in instruction("COPY"):
        for src in args.split()[:-1]:
            assert os.path.exists(os.path.join(ROOT, src)), src
    ignore = open(os.path.join(ROOT, ".dockerignore"), encoding="utf-8").read()
    assert "!token_server.py" in ignore and "!server/" in ignore and "!requirements-runtime.txt" in ignore


def test_the_dockerfiles_pip_line_installs_on_this_machine() -> None:
    (pip,) = [args for args in instruction("RUN") if args.startswith("pip install")]
    argv = shlex.split(pip)
    # The same arguments with this interpreter: every requirement is already satisfied here
    # (.ci/run installed requirements.txt), so this checks the file and its pins, offline.
    result = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_the_dockerfiles_cmd_checks_the_example_config(tmp_path) -> None:
    (cmd,) = instruction("CMD")
    argv = json.loads(cmd)
    assert argv[:2] == ["python", "token_server.py"]
    config = tmp_path / "config.yaml"
    config.write_text(open(os.path.join(ROOT, "config.example.yaml"), encoding="utf-8").read().replace("appid: wx123,", "appid: wx0a1b2c3d4e5f6a7b,"))
    config.chmod(0o640)
    argv = [sys.executable if a == "python" else str(config) if a == "/etc/wechat-token-server/config.yaml" else a for a in argv]
    env = {"PATH": os.environ["PATH"], "TOKEN_SERVER_SECRET": GOOD_SECRET, "WECHAT_APPSECRET": "f" * 32,
           "REDIS_URL": "redis://redis:6379/0", "TOKEN_SERVER_HOST": "0.0.0.0"}  # what compose.yaml sets
    result = subprocess.run([*argv, "--check"], cwd=ROOT, capture_output=True, text=True, timeout=30, env=env)
    assert result.returncode == 0, result.stderr
    compose = open(os.path.join(ROOT, "compose.yaml"), encoding="utf-8").read()
    assert "REDIS_URL: redis://redis:6379/0" in compose and "TOKEN_SERVER_HOST: 0.0.0.0" in compose
    assert "./config.yaml:/etc/wechat-token-server/config.yaml:ro" in compose


def test_the_dockerfiles_healthcheck_answers_against_a_running_server(tmp_path) -> None:
    (health,) = instruction("HEALTHCHECK")
    argv = json.loads(health.split("CMD", 1)[1])
    assert argv[0] == "python" and "/healthz" in argv[-1]
    port = free_port()
    probe = [sys.executable, *argv[1:-1], argv[-1].replace(":12123/", f":{port}/")]
    assert subprocess.run(probe, capture_output=True, timeout=30).returncode != 0  # nothing listening: unhealthy
    proc = subprocess.Popen([sys.executable, "token_server.py", "--demo", "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "the demo did not start"
                time.sleep(0.1)
        assert subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
