"""The command line: convert's check and the dump formats."""
import json
import shutil

import pytest

from moefx.cli import main

PLAN = "examples/plans/tiny_pr_moe.toml"


def test_convert_default_checks_function_preservation(capsys):
    assert main(["convert"]) == 0
    out = capsys.readouterr().out
    assert "PR-MoE" in out and "function preserved: yes" in out


@pytest.mark.parametrize("fmt", ["code", "table", "dot", "json"])
def test_dump_formats(tmp_path, fmt):
    path = tmp_path / f"g.{fmt}"
    assert main(["dump", "gpt2-tiny", "--plan", PLAN, "--format", fmt, "-o", str(path)]) == 0
    text = path.read_text()
    if fmt == "code":
        assert "def forward" in text and "moe1.experts" in text and "dispatch" in text
    elif fmt == "table":
        assert "PR-MoE" in text and "dense" in text and "torch" in text
    elif fmt == "dot":
        assert text.startswith("digraph") and "cluster_block1" in text and "[torch]" in text
    else:
        data = json.loads(text)
        assert [layer["experts"] for layer in data["moe_layers"]] == [4, 8]
        roles = [n.get("role") for n in data["nodes"]]
        assert roles.count("dispatch") == 2 and roles.count("combine") == 2
        assert data["passes"] == ["pr_moe", "lower_gating"]


def test_dump_svg(tmp_path):
    path = tmp_path / "g.svg"
    if shutil.which("dot") is None:
        assert main(["dump", "gpt2-tiny", "--format", "svg", "-o", str(path)]) == 2
        assert not path.exists()
    else:
        assert main(["dump", "gpt2-tiny", "--format", "svg", "-o", str(path)]) == 0
        assert path.read_text().lstrip().startswith("<?xml")


def test_dump_captured_stage_and_meta(capsys):
    assert main(["dump", "bert-tiny", "--stage", "captured", "--format", "code"]) == 0
    assert "moe0" not in capsys.readouterr().out
    assert main(["dump", "gpt2-medium-24", "--device", "meta", "--plan",
                 "examples/plans/350m_pr_moe_32_64.toml", "--format", "table"]) == 0
    assert "64" in capsys.readouterr().out


def test_errors_are_reported_not_raised(capsys):
    assert main(["dump", "no-such-model"]) == 2
    assert "gpt2-tiny" in capsys.readouterr().err
    assert main(["convert", "gpt2-tiny", "--plan", "missing.toml"]) == 2


def test_distill_command(tmp_path, capsys):
    out = tmp_path / "student.pt"
    assert main(["distill", "gpt2-tiny", "--plan", "examples/plans/tiny_pr_mos.toml", "--steps", "6", "--kd-stop",
                 "3", "--corpus-bytes", "100000", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "student keeps teacher blocks (0, 2, 3)" in text
    state = __import__("torch").load(out)
    assert not any(k.startswith("moe0.") for k in state) and any(k.startswith("moe1.") for k in state)


def test_distill_needs_a_student_section(capsys):
    assert main(["distill", "gpt2-tiny", "--plan", PLAN, "--steps", "2"]) == 2
    assert "[student]" in capsys.readouterr().err
