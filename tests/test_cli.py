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
    lines = capsys.readouterr().out.splitlines()
    header = lines.index(next(line for line in lines if line.split()[:3] == ["block", "ffn", "experts"]))
    rows = [line.split() for line in lines[header + 2:] if line.strip() and line.split()[0].isdigit()]
    assert [int(r[0]) for r in rows] == list(range(24))
    # experts = "32x10+64x2", every = 2: PR-MoE in the odd blocks, 32 experts in the first 10, 64 in the last 2
    assert {int(r[0]): r[1] for r in rows if r[1] != "dense"} == {b: "PR-MoE" for b in range(1, 24, 2)}
    assert [int(r[2]) for r in rows if r[1] != "dense"] == [32] * 10 + [64] * 2
    assert all(r[2] == "-" for r in rows if r[1] == "dense")


def test_errors_are_reported_not_raised(capsys):
    assert main(["dump", "no-such-model"]) == 2
    assert "gpt2-tiny" in capsys.readouterr().err
    assert main(["convert", "gpt2-tiny", "--plan", "missing.toml"]) == 2


def test_distill_command_writes_a_checkpoint_generate_reads_without_a_plan(tmp_path, capsys):
    from moefx.dist.checkpoint import checkpoint_tensors, read_info

    out = tmp_path / "student"
    assert main(["distill", "gpt2-tiny", "--plan", "examples/plans/tiny_pr_mos.toml", "--steps", "4", "--kd-stop",
                 "2", "--batch", "2", "--seq", "16", "--no-progress", "--save", str(out)]) == 0
    assert "rank 0/1: ok 4 steps" in capsys.readouterr().out
    names = set(checkpoint_tensors(out))
    # the MoS student keeps teacher blocks (0, 2, 3): the first MoE layer (block 1) is gone
    assert not any(k.startswith("moe0.") for k in names) and any(k.startswith("moe1.") for k in names)
    record = read_info(out)["record"]
    assert record["model"]["name"] == "gpt2-tiny" and record["plan"]["student"]["layers"] == 3
    assert record["versions"]["torch"] is not None
    assert main(["generate", "--load", str(out), "--prompt-ids", "1,2,3", "--max-new-tokens", "3"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("row 0:")]
    assert len(rows) == 1 and rows[0].split()[2:5] == ["1", "2", "3"] and len(rows[0].split()) == 2 + 6


def test_distill_needs_a_student_section(capsys):
    assert main(["distill", "gpt2-tiny", "--plan", PLAN, "--steps", "2"]) == 2
    assert "[student]" in capsys.readouterr().err


def test_a_training_checkpoint_records_its_plan_and_refuses_another(tmp_path, capsys):
    trained = tmp_path / "two_experts.toml"          # not moefx.Plan.default() (4 / 8 experts)
    trained.write_text("[moe]\nexperts = [2, 2]\nevery = 2\nresidual = true\ndrop_tokens = false\n")
    ckpt = tmp_path / "ckpt"
    assert main(["train", "gpt2-tiny", "--plan", str(trained), "--steps", "1", "--batch", "2", "--seq", "8",
                 "--no-progress", "--checkpoint-dir", str(ckpt)]) == 0
    step = ckpt / "step0000001"
    capsys.readouterr()
    # MODEL without --plan: the recorded plan is used (the default one has other expert counts)
    assert main(["generate", "gpt2-tiny", "--load", str(step), "--prompt-ids", "5,6", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("row 0: 5 6 ")
    # dump shows the recorded model and plan: 2 experts in both MoE layers (the default plan: 4 and 8)
    assert main(["dump", "--load", str(step), "--device", "meta", "--format", "table"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if "MoE" in line]
    assert [(r[1], r[2]) for r in rows] == [("PR-MoE", "2"), ("PR-MoE", "2")]
    # the same model under a plan without the residual MLP: refused, naming the tensors only the checkpoint has
    other = tmp_path / "no_residual.toml"
    other.write_text(trained.read_text().replace("residual = true", "residual = false"))
    assert main(["generate", "gpt2-tiny", "--plan", str(other), "--load", str(step), "--prompt-ids", "5,6",
                 "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "does not fit this model" in err and "of the checkpoint are not in the model" in err
    assert "moe0.coef.weight" in err


def test_convert_and_dump_take_a_hugging_face_folder(tmp_path, capsys):
    from moefx.models import load_model

    model, _ = load_model("llama-tiny")
    model.save_pretrained(tmp_path / "hf")
    assert main(["convert", "--weights", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert "function preserved: yes" in out and out.count("PR-MoE") == 2
    assert main(["dump", "-", "--weights", str(tmp_path / "hf"), "--device", "meta", "--target", "cuda",
                 "--format", "table"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if "MoE" in line]
    assert [(r[1], r[6]) for r in rows] == [("PR-MoE", "triton"), ("PR-MoE", "triton")]
