"""What a new user hits first (issue 24): one set of plan defaults, convert saying what it did, and
inputs refused up front with a message naming the fix instead of a raw error mid-way."""
import pytest
import torch

import moefx
from moefx.cli import main
from moefx.errors import MoefxError
from moefx.models import load_model
from moefx.plan import MoEPlan, Plan


def test_a_partial_plan_gets_the_defaults_of_no_plan(tmp_path):
    partial = tmp_path / "p.toml"
    partial.write_text("[moe]\nexperts = [4, 8]\n")
    got, default = Plan.from_file(partial).moe, Plan.default().moe
    assert (got.every, got.residual, got.drop_tokens, got.top_k) == (default.every, default.residual,
                                                                      default.drop_tokens, default.top_k) == (2, True,
                                                                                                              False, 1)
    assert Plan.from_dict({"moe": {}}) == Plan.default()
    assert "every=2" in Plan.default().describe() and "residual=True" in Plan.default().describe()


def test_the_effective_plan_is_printed_at_start(capsys):
    assert main(["convert", "gpt2-tiny", "--device", "meta"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan:\n  [moe] experts={'levels': [4, 8], 'boundaries': [0.5]} every=2 top_k=1 residual=True")


@pytest.mark.parametrize("text", ["", "[lowering]\ngating = 'torch'\n"])
def test_a_plan_that_converts_nothing_says_so(tmp_path, capsys, text):
    plan = tmp_path / "p.toml"
    plan.write_text(text)
    assert main(["convert", "gpt2-tiny", "--plan", str(plan)]) == 1
    out = capsys.readouterr().out
    assert "nothing converted" in out and "function preserved" not in out
    with pytest.warns(UserWarning, match="nothing is converted"):
        moefx.convert(torch.nn.Sequential(torch.nn.Linear(4, 4)), Plan.from_file(plan), (torch.randn(2, 4),))


def test_prob_combine_weight_is_expected_to_differ_not_a_failure(tmp_path, capsys):
    plan = tmp_path / "p.toml"
    plan.write_text('[moe]\ncombine_weight = "prob"\n')
    assert main(["convert", "gpt2-tiny", "--plan", str(plan)]) == 0
    out = capsys.readouterr().out
    assert 'outputs are expected to differ: combine_weight = "prob"' in out and "function preserved" not in out
    assert MoEPlan(combine_weight="prob", top_k=2).inexact_reasons() == []      # top-k weights are renormalised
    assert len(MoEPlan(drop_tokens=True, init_noise=0.1).inexact_reasons()) == 2


@pytest.fixture(scope="module")
def gpt2_generator():
    model, _ = load_model("gpt2-tiny")              # 64 positions, vocabulary 128
    assert (model.config.n_positions, model.config.vocab_size) == (64, 128)
    return model, moefx.convert_generator(model, None, batch_size=2, max_cache_len=16)


def test_generator_refuses_a_cache_past_the_model_positions(gpt2_generator):
    model, _ = gpt2_generator
    with pytest.raises(MoefxError, match=r"max_cache_len 100 exceeds the model's 64 positions \(config\."):
        moefx.convert_generator(model, None, batch_size=1, max_cache_len=100)


def test_generate_refuses_bad_prompts_before_any_work(gpt2_generator):
    _, gen = gpt2_generator
    ids = torch.tensor([[1, 2, 3]])
    gen = _WithFewTokens(gen)
    with pytest.raises(MoefxError, match=r"\[batch, tokens\].*ids\[None\]"):
        gen.generate(torch.tensor([1, 2, 3]))
    with pytest.raises(MoefxError, match=r"outside the model's vocabulary \[0, 128\)"):
        gen.generate(torch.tensor([[1, 200]]))
    with pytest.raises(MoefxError, match="outside the model's vocabulary"):
        gen.generate(torch.tensor([[-1, 2]]))
    with pytest.raises(MoefxError, match=r"attention_mask rows \[0\] are not left-padded"):
        gen.generate(ids, torch.tensor([[1, 1, 0]]))
    with pytest.raises(MoefxError, match="max_new_tokens must be an int >= 1"):
        gen.generate(ids, max_new_tokens=0)
    assert gen.generate(ids, torch.tensor([[0, 1, 1]]), max_new_tokens=2).shape == (1, 5)   # left padding is fine


class _WithFewTokens:
    """The generator with max_new_tokens=2 unless given (the cache holds 16)."""

    def __init__(self, gen):
        self.gen = gen

    def generate(self, *args, **kwargs):
        return self.gen.generate(*args, **{"max_new_tokens": 2, **kwargs})


def test_aux_loss_before_any_forward_is_an_error():
    model, (ids,) = load_model("gpt2-tiny")
    gm = moefx.convert(model.train(), None, (ids,), train=True)
    with pytest.raises(MoefxError, match="before any forward"):
        moefx.aux_loss(gm)
    gm(ids)
    assert moefx.aux_loss(gm).item() > 0
    assert moefx.aux_loss(torch.nn.Linear(2, 2)).item() == 0          # no MoE layer: nothing to sum


@pytest.mark.parametrize("argv, message", [
    (["--prompt-ids", "1,-2"], "token ids [-2] are negative: token ids start at 0"),
    (["--prompt-ids", ""], "has an empty row"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: 0 is not >= 1"),
    (["--max-new-tokens", "-3"], "argument --max-new-tokens: -3 is not >= 1"),
    (["--max-cache-len", "100"], "max_cache_len 100 exceeds the model's 64 positions"),
    (["--max-new-tokens", "70"], "max_cache_len 78 exceeds the model's 64 positions"),
])
def test_generate_command_refuses_bad_options(capsys, argv, message):
    try:
        code = main(["generate", "gpt2-tiny", *argv])
    except SystemExit as e:                       # argparse's usage error
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_bad_files_and_sizes_are_named_before_training(tmp_path, capsys):
    from moefx.models import load_model

    model, _ = load_model("llama-tiny")
    model.save_pretrained(tmp_path / "hf")
    st = tmp_path / "hf" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:100])                      # an interrupted copy
    assert main(["convert", "--weights", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors' is not a readable safetensors file" in err and "truncated" in err

    (tmp_path / "empty.bin").write_bytes(b"")
    assert main(["train", "llama-tiny", "--data", str(tmp_path / "empty.bin"), "--steps", "1"]) == 2
    assert "empty.bin is empty" in capsys.readouterr().err

    assert main(["train", "gpt2-tiny", "--seq", "100", "--steps", "1"]) == 2
    assert "--seq 100 exceeds the model's 64 positions" in capsys.readouterr().err

    (tmp_path / "a_file").write_text("")
    for option in ("--metrics-csv", "--loss-svg"):
        assert main(["train", "llama-tiny", "--steps", "1", option, str(tmp_path / "a_file" / "out")]) == 2
        assert f"{option} {tmp_path / 'a_file' / 'out'}: cannot write there" in capsys.readouterr().err


def test_a_step_that_cannot_fit_is_refused_before_the_first_forward(capsys):
    from moefx.memory import activation_bytes

    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    assert activation_bytes(moefx.capture(mlp, (torch.randn(3, 4),))) == 4 * 3 * (8 + 8 + 2)   # fp32 intermediates
    assert main(["train", "llama-tiny", "--batch", "100000000", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "a training step of --batch 100000000 x --seq 8 tokens holds about" in err and "memory available" in err


def test_the_command_line_explains_itself(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("moefx ")
    assert main([]) == 2                                             # a bare moefx lists the commands
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in ("convert", "generate", "train", "distill", "launch", "calibrate"))
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    assert "(default: prompt + max-new-tokens)" in out and "(default: None)" not in out
    with pytest.raises(SystemExit):
        main(["launch", "--help"])
    out = capsys.readouterr().out
    assert "--train:" in out and "--steps" in out and "--prompt-ids" in out      # the jobs' own options
    plan = tmp_path / "ep2.toml"
    plan.write_text("[parallel]\nnodes = 1\ndevices_per_node = 2\nep = 2\n")
    assert main(["launch", "--nproc-per-node", "2", "--plan", str(plan), "nanogpt-tiny", "--steps", "3"]) == 2
    assert "does not take --steps (--steps belongs to the --train / --distill job: add that flag)" in \
        capsys.readouterr().err


def test_an_input_the_capture_did_not_see_names_example_kwargs():
    model, (ids,) = load_model("llama-tiny")
    gm = moefx.convert(model, None, (ids,))
    with pytest.raises(MoefxError, match=r"captured with \(input_ids\), not attention_mask: convert it with "
                                         r"example_kwargs=\{'attention_mask': \.\.\.\}"):
        gm(ids, attention_mask=torch.ones_like(ids))
    mask = torch.ones_like(ids)
    with_mask = moefx.convert(model, None, (ids,), {"attention_mask": mask})
    assert torch.equal(with_mask(ids, attention_mask=mask).logits, gm(ids).logits)
