"""CI runs what the README tells a new user to run, with the versions constraints.txt pins."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAMED_PINS = ("torch", "triton", "pytest", "onnx", "onnxruntime", "av", "ray", "numpy")


def readme_commands() -> list[str]:
    """The commands of README.md's first code block (the install and the test command)."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README.md has no ```bash block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not NAME==VERSION"
            out[name.lower().replace("_", "-")] = version
    return out


def test_ci_runs_the_readme_commands_exactly():
    commands = readme_commands()
    assert len(commands) == 2 and "pip install" in commands[0] and "pytest" in commands[1], commands
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for command in commands:
        assert command in ci, f".ci/run does not run the README's command {command!r}"


def test_the_install_is_pinned():
    install = readme_commands()[0].split()
    assert install[install.index("-c") + 1] == "constraints.txt"
    pinned = pins()
    for name in NAMED_PINS:
        assert name in pinned, f"constraints.txt does not pin {name}"
    for req in ("requirements.txt", "requirements-distributed.txt"):
        for line in (ROOT / req).read_text().splitlines():
            line = line.split("#")[0].split(";")[0].strip()
            if line and not line.startswith("-"):
                name = re.match(r"[A-Za-z0-9_.-]+", line).group(0).lower().replace("_", "-")
                assert name in pinned, f"{req} names {name}, which constraints.txt does not pin"
