"""The README's examples run as written: every ```python block, and every `spa ...` command of the
usage block (optional [...] parts dropped), on a small model named as the README names it."""
import os
import re
import shlex
import subprocess
import sys

import onnx
import pytest

from spa.cli import main
from test_cli import small_model

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def blocks(language: str) -> list:
    text = open(README).read()
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def usage_commands() -> list:
    """`spa ...` lines of the first plain block listing commands, ready to run."""
    usage = next(b for b in blocks("") if b.lstrip().startswith("spa "))
    commands = []
    for line in usage.splitlines():
        line = line.split("#")[0].strip()
        if not line.startswith("spa ") or "|" in line or "..." in line:
            continue
        commands.append(shlex.split(re.sub(r"\[[^\]]*\]", "", line))[1:])
    return commands


def torch_setup(namespace):
    torch = pytest.importorskip("torch")
    from torch import nn
    torch.manual_seed(0)
    namespace["model"] = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                       nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    namespace["x"] = torch.randn(2, 3, 8, 8)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    onnx.save(small_model(), "model.onnx")
    return tmp_path


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_block_runs(workdir, index):
    code = blocks("python")[index]
    namespace = {"onnx": onnx, "__name__": "readme"}
    if "spa.frontends.torch" in code:
        torch_setup(namespace)
    exec(compile(code, f"README.md python block {index}", "exec"), namespace)


@pytest.mark.parametrize("argv", usage_commands(), ids=lambda argv: " ".join(argv[:2]))
def test_usage_command_runs(workdir, argv, capsys):
    if argv[0] == "apply-plan":
        assert main(["prune", "model.onnx", "-o", "small.onnx", "--ratio", "0.5", "--plan-out", "plan.json",
                     "-q"]) == 0
    if "--ratios-from" in argv:
        assert main(["sensitivity", "model.onnx", "-o", "sensitivity.json", "-q"]) == 0
    code = main(argv + ["-q"])
    if code == 2 and "--target-latency" in argv:
        # this model runs in ~35 microseconds: its timings are noise, and a latency target it then
        # misses must be reported with the achieved figure (exit 2), never met silently
        err = capsys.readouterr().err
        assert "cannot be met" in err and "predicted at" in err, err
        return
    assert code == 0


def test_python_dash_m_spa_is_the_cli(workdir):
    out = subprocess.run([sys.executable, "-m", "spa", "analyze", "model.onnx", "-q"], capture_output=True,
                         text=True, check=True).stdout
    assert "prunable" in out
