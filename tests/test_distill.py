"""Staged-KD trainer: loss bookkeeping, KD stop, teacher safety, exact resume, tasks, masks."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from moefx.errors import DistillError
from moefx.train.distill import DistillResult, distill
from moefx.train.losses import distill_losses, extract_logits
from moefx.nn.aux import AuxLossSink

VOCAB = 32


class TinyLM(nn.Module):
    """Embedding, residual MLP blocks, dropout, head; optionally a fake MoE aux loss."""

    def __init__(self, vocab=VOCAB, d=16, layers=1, dropout=0.1, aux_coef=None, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)) for _ in range(layers)
        )
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(d, vocab)
        self.sink = AuxLossSink(aux_coef) if aux_coef is not None else None

    def forward(self, ids):
        h = self.emb(ids)
        for block in self.blocks:
            h = h + block(h)
        h = self.drop(h)
        if self.sink is not None:
            self.sink(h.pow(2).mean())
        return self.head(h)


class TinyClassifier(nn.Module):
    def __init__(self, classes=5, d=16, seed=0, wrap=False):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, d)
        self.head = nn.Linear(d, classes)
        self.wrap = wrap

    def forward(self, ids):
        logits = self.head(self.emb(ids).mean(1))
        return {"logits": logits} if self.wrap else (logits, None)


def lm_batches(n=8, b=4, t=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, VOCAB, (b, t), generator=g),) for _ in range(n)]


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- staged KD


def test_kd_on_before_kd_stop_and_zero_after():
    teacher, student = TinyLM(layers=2, seed=0), TinyLM(seed=1)
    res = distill(teacher, student, lm_batches(), steps=6, kd_stop=3, progress=False)
    assert isinstance(res, DistillResult) and res.task == "causal_lm" and res.student is student
    assert [r["step"] for r in res.history] == list(range(6))
    assert all(set(r) == {"step", "lm", "kd", "aux", "total", "lr"} for r in res.history)
    assert all(r["kd"] > 0 for r in res.history[:3])
    assert all(r["kd"] == 0.0 for r in res.history[3:])
    for r in res.history:
        assert r["total"] == pytest.approx(r["lm"] + r["aux"] + r["kd"], rel=1e-6, abs=1e-7)
        assert r["aux"] == 0.0 and r["lr"] == pytest.approx(3e-4)


def test_kd_stop_none_and_zero():
    always = distill(TinyLM(seed=0), TinyLM(seed=1), lm_batches(), steps=4, kd_stop=None,
                     progress=False)
    assert all(r["kd"] > 0 for r in always.history)
    never = distill(TinyLM(seed=0), TinyLM(seed=1), lm_batches(), steps=4, kd_stop=0,
                    progress=False)
    assert all(r["kd"] == 0.0 for r in never.history)


def test_kd_term_is_alpha_t2_kl():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, VOCAB), torch.randn(2, 5, VOCAB)
    labels = torch.randint(0, VOCAB, (2, 5))
    out = distill_losses(s, t, labels, task="causal_lm", kd_alpha=0.5, temperature=2.0)
    p_t = torch.softmax(t[:, :-1] / 2, -1)
    kl = (p_t * (p_t.log() - torch.log_softmax(s[:, :-1] / 2, -1))).sum(-1).mean()
    assert out["kd"].item() == pytest.approx(0.5 * 4 * kl.item(), rel=1e-5)
    ce = nn.functional.cross_entropy(s[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    assert out["lm"].item() == pytest.approx(ce.item(), rel=1e-5)


def test_teacher_frozen_unchanged_and_flags_restored_student_trained():
    teacher, student = TinyLM(layers=2, seed=0), TinyLM(seed=1)
    teacher.head.weight.requires_grad_(False)  # a flag the user set must come back as is
    before_t, before_s = snapshot(teacher), snapshot(student)
    teacher.train()
    distill(teacher, student, lm_batches(), steps=5, kd_stop=5, progress=False)
    assert same_weights(before_t, snapshot(teacher))
    assert not same_weights(before_s, snapshot(student))
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.head.weight.requires_grad and teacher.emb.weight.requires_grad
    assert teacher.training and student.training


# ----------------------------------------------------------------------------- resume


def _resume_kwargs(tmp, **extra):
    return dict(steps=8, kd_stop=5, lr=1e-2, eval_batches=lm_batches(n=2, seed=9), eval_every=3,
                checkpoint_dir=str(tmp), checkpoint_every=2, progress=False, seed=3, **extra)


def test_resume_from_middle_is_bit_exact(tmp_path):
    batches = lm_batches()
    full = distill(TinyLM(layers=2, seed=0), TinyLM(seed=1), batches,
                   **_resume_kwargs(tmp_path / "full"))

    def crashing(step):
        if step == 5:
            raise RuntimeError("simulated crash")
        return batches[step % len(batches)]

    with pytest.raises(RuntimeError, match="simulated crash"):
        distill(TinyLM(layers=2, seed=0), TinyLM(seed=1), crashing,
                **_resume_kwargs(tmp_path / "cut"))
    ckpt = tmp_path / "cut" / "distill.pt"
    assert ckpt.exists()
    assert [f for f in os.listdir(tmp_path / "cut") if f != "distill.pt"] == []  # no temp left
    # Fresh, differently initialised student: every weight must come from the checkpoint.
    resumed = distill(TinyLM(layers=2, seed=0), TinyLM(seed=7), batches,
                      **_resume_kwargs(tmp_path / "cut"))
    assert resumed.resumed_from == 4
    assert resumed.history == full.history
    assert resumed.eval_history == full.eval_history
    assert [e["step"] for e in full.eval_history] == [3, 6, 8]
    assert resumed.teacher_eval_loss == full.teacher_eval_loss
    assert same_weights(snapshot(full.student), snapshot(resumed.student))
    # A finished checkpoint resumes to an immediate, identical return.
    again = distill(TinyLM(layers=2, seed=0), TinyLM(seed=7), batches,
                    **_resume_kwargs(tmp_path / "cut"))
    assert again.resumed_from == 8 and again.history == full.history


def test_resume_false_starts_over(tmp_path):
    kw = dict(steps=3, kd_stop=2, checkpoint_dir=str(tmp_path), progress=False)
    a = distill(TinyLM(seed=0), TinyLM(seed=1), lm_batches(), **kw)
    b = distill(TinyLM(seed=0), TinyLM(seed=1), lm_batches(), resume=False, **kw)
    assert b.resumed_from is None and a.history == b.history


# ----------------------------------------------------------------------------- tasks, masks, aux


def test_classification_with_dict_outputs_and_labels():
    g = torch.Generator().manual_seed(0)
    batches = [{"inputs": (torch.randint(0, VOCAB, (6, 7), generator=g),),
                "labels": torch.randint(0, 5, (6,), generator=g)} for _ in range(4)]
    res = distill(TinyClassifier(seed=0, wrap=True), TinyClassifier(seed=1), batches, steps=4,
                  kd_stop=2, temperature=2.0, eval_batches=batches[:2], progress=False)
    assert res.task == "classification"
    assert all(r["kd"] > 0 for r in res.history[:2]) and res.history[2]["kd"] == 0.0
    assert res.final_eval_loss > 0 and res.teacher_eval_loss > 0


def test_regression_kd_is_mse_to_teacher():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, generator=g)
    y = x.sum(1)
    torch.manual_seed(0)
    teacher, student = nn.Linear(3, 1), nn.Linear(3, 1)
    with torch.no_grad():
        lm0 = (student(x).squeeze(-1) - y).pow(2).mean().item()
        kd0 = 0.5 * (student(x) - teacher(x)).pow(2).mean().item()
    res = distill(teacher, student, [{"inputs": (x,), "labels": y}], steps=3, kd_stop=2,
                  kd_alpha=0.5, temperature=4.0, progress=False)
    assert res.task == "regression"
    assert res.history[0]["lm"] == pytest.approx(lm0, rel=1e-6)
    assert res.history[0]["kd"] == pytest.approx(kd0, rel=1e-6)  # no T^2 for regression
    assert res.history[2]["kd"] == 0.0


class KwargsLM(TinyLM):
    """HF-style signature: keyword inputs, ModelOutput-like result."""

    def forward(self, input_ids, attention_mask=None):
        return {"logits": super().forward(input_ids)}


def test_kwargs_batches_attention_mask_and_eval_loss():
    ids = lm_batches(n=1, seed=5)[0][0]
    attn = torch.ones_like(ids)
    attn[1, 7:] = 0
    labels = ids.clone()
    labels[1, 7:] = -100
    kw = dict(steps=2, kd_stop=2, progress=False)
    by_mask = distill(KwargsLM(seed=0), KwargsLM(seed=1, dropout=0.0),
                      [{"input_ids": ids, "attention_mask": attn}], **kw)
    by_label = distill(KwargsLM(seed=0), KwargsLM(seed=1, dropout=0.0),
                       [{"input_ids": ids, "attention_mask": attn, "labels": labels}], **kw)
    assert by_mask.history == by_label.history
    # eval_loss: mean next-token CE over every unmasked target of all eval batches
    student = KwargsLM(seed=1, dropout=0.0)
    res = distill(KwargsLM(seed=0), student, [{"input_ids": ids}], steps=1, kd_stop=1,
                  eval_batches=[{"input_ids": ids, "attention_mask": attn}], progress=False)
    with torch.no_grad():
        logits = student(ids)["logits"][:, :-1]
        nll = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                                          reduction="sum", ignore_index=-100)
    n = (labels[:, 1:] != -100).sum()
    assert res.eval_history == [{"step": 1, "eval_loss": pytest.approx((nll / n).item(), rel=1e-6)}]


def test_masked_targets_do_not_count():
    torch.manual_seed(0)
    s, t = torch.randn(2, 6, VOCAB), torch.randn(2, 6, VOCAB)
    labels = torch.randint(0, VOCAB, (2, 6))
    labels[0, 4:] = -100  # targets 4, 5 of row 0 -> predicted by logits at 3, 4
    base = distill_losses(s, t, labels, task="causal_lm")
    s2, t2 = s.clone(), t.clone()
    s2[0, 3:] += 5 * torch.randn(3, VOCAB)
    t2[0, 3:] -= 5 * torch.randn(3, VOCAB)
    moved = distill_losses(s2, t2, labels, task="causal_lm")
    assert torch.equal(base["lm"], moved["lm"]) and torch.equal(base["kd"], moved["kd"])
    # loss_mask 0 is the same as label -100
    mask = (labels != -100).long()
    clean = labels.clone()
    clean[0, 4:] = 7
    via_mask = distill_losses(s, t, clean, task="causal_lm", loss_mask=mask)
    assert torch.equal(via_mask["lm"], base["lm"]) and torch.equal(via_mask["kd"], base["kd"])


def test_padding_in_training_batches():
    ids = lm_batches(n=1, seed=4)[0][0]
    labels = ids.clone()
    labels[:, 8:] = -100
    res = distill(TinyLM(seed=0), TinyLM(seed=1, dropout=0.0),
                  [{"inputs": (ids,), "labels": labels}], steps=2, kd_stop=2, progress=False)
    # Same loss when the padded positions hold other tokens (the model is position-wise).
    ids2 = ids.clone()
    ids2[:, 9:] = 0
    res2 = distill(TinyLM(seed=0), TinyLM(seed=1, dropout=0.0),
                   [{"inputs": (ids2,), "labels": labels}], steps=2, kd_stop=2, progress=False)
    assert res.history == res2.history


def test_aux_loss_of_student_is_added():
    teacher, student = TinyLM(seed=0), TinyLM(seed=1, aux_coef=0.5)
    res = distill(teacher, student, lm_batches(), steps=3, kd_stop=1, progress=False)
    assert all(r["aux"] > 0 for r in res.history)
    for r in res.history:
        assert r["total"] == pytest.approx(r["lm"] + r["aux"] + r["kd"], rel=1e-6)
    assert student.sink.value is not None
    assert res.history[-1]["aux"] == pytest.approx(student.sink.value.item(), rel=1e-6)  # the sink holds coef * l_aux


# ----------------------------------------------------------------------------- models, batches


def test_extract_logits_variants():
    x = torch.randn(2, 3)
    assert extract_logits(x) is x
    assert extract_logits((x, None)) is x
    assert extract_logits(([x],)) is x
    assert extract_logits({"logits": x, "loss": None}) is x
    import transformers.modeling_outputs as transformers
    assert extract_logits(transformers.CausalLMOutput(logits=x)) is x
    with pytest.raises(DistillError, match="logits"):
        extract_logits(None)


def test_exported_teacher_and_iterator_batches():
    teacher = TinyLM(layers=2, seed=0, dropout=0.0).eval()
    ids = lm_batches(n=1)[0][0]
    exported = torch.export.export(teacher, (ids,)).module()
    batches = lm_batches(n=3)
    res = distill(exported, TinyLM(seed=1), iter(batches), steps=3, kd_stop=3, progress=False)
    eager = distill(teacher, TinyLM(seed=1), batches, steps=3, kd_stop=3, progress=False)
    assert [r["kd"] for r in res.history] == pytest.approx([r["kd"] for r in eager.history])


def test_progress_output(capsys):
    distill(TinyLM(seed=0), TinyLM(seed=1), lm_batches(), steps=2, kd_stop=1, log_every=1,
            progress=True)
    err = capsys.readouterr().err
    assert "lm=" in err and "kd=" in err and "aux=" in err


def test_progress_without_tqdm(capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "tqdm", None)  # import tqdm -> ImportError
    distill(TinyLM(seed=0), TinyLM(seed=1), lm_batches(), steps=2, kd_stop=1, log_every=2,
            progress=True)
    err = capsys.readouterr().err
    assert "distill step 2/2 lm=" in err and "kd=0.0000" in err


def test_lr_schedule_grad_clip_and_custom_optimizer():
    res = distill(TinyLM(seed=0), TinyLM(seed=1), lm_batches(), steps=3, kd_stop=1,
                  optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
                  lr_schedule=lambda step: 1.0 / (step + 1), grad_clip=0.5, progress=False)
    assert [r["lr"] for r in res.history] == pytest.approx([0.1, 0.05, 0.1 / 3])


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, batches, match",
    [
        (dict(steps=4, kd_stop=5), None, "kd_stop=5 is past steps=4"),
        (dict(steps=4, kd_stop=2), [], "train_batches is empty"),
        (dict(steps=4, kd_stop=2), [(torch.zeros(2, 0, dtype=torch.long),)], "empty"),
        (dict(steps=4, kd_stop=2), [{}], "empty"),
        (dict(steps=4, kd_stop=2, checkpoint_every=2), None, "checkpoint_dir"),
        (dict(steps=4, kd_stop=2, task="seq2seq"), None, "task must be"),
        (dict(steps=0, kd_stop=0), None, "steps"),
    ],
)
def test_argument_errors(kwargs, batches, match):
    with pytest.raises(ValueError, match=match):
        distill(TinyLM(seed=0), TinyLM(seed=1), lm_batches() if batches is None else batches,
                progress=False, **kwargs)


def test_vocab_mismatch_and_shared_parameters():
    with pytest.raises(ValueError, match="vocab/classes 32, student 40"):
        distill(TinyLM(seed=0), TinyLM(vocab=40, seed=1), lm_batches(), steps=2, kd_stop=1,
                progress=False)
    teacher = TinyLM(seed=0)
    with pytest.raises(ValueError, match="share"):
        distill(teacher, teacher, lm_batches(), steps=2, kd_stop=1, progress=False)
    assert all(p.requires_grad for p in teacher.parameters())


def test_fully_masked_batch_is_an_error():
    ids = lm_batches(n=1)[0][0]
    batch = {"inputs": (ids,), "labels": torch.full_like(ids, -100)}
    with pytest.raises(ValueError, match="step 0: every target"):
        distill(TinyLM(seed=0), TinyLM(seed=1), [batch], steps=1, kd_stop=1, progress=False)


def test_non_finite_loss_stops_or_skips_and_changed_lr_warns(tmp_path):
    """A NaN loss stops the run naming the step (or is skipped and counted); a resume with another lr
    says so."""
    from moefx.train.distill import distill as run

    class Tiny(torch.nn.Module):
        def __init__(self, poison=()):
            super().__init__()
            self.emb, self.out = torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16)
            self.poison, self.calls = set(poison), 0

        def forward(self, ids):
            self.calls += 1
            y = self.out(self.emb(ids))
            return y * float("nan") if self.calls in self.poison else y

    batches = [(torch.randint(0, 16, (2, 6), generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    with pytest.raises(DistillError, match="step 2: the loss is nan"):
        run(Tiny(), Tiny({2}), batches, steps=4, kd_stop=0, progress=False)
    result = run(Tiny(), Tiny({2}), batches, steps=4, kd_stop=0, progress=False, nonfinite="skip")
    assert result.skipped == 1 and all(torch.isfinite(p).all() for p in result.student.parameters())
    torch.manual_seed(0)
    teacher, student = Tiny(), Tiny()
    run(teacher, student, batches, steps=2, kd_stop=0, progress=False, checkpoint_dir=tmp_path, lr=1e-3)
    with pytest.warns(UserWarning, match="'lr': \\(0.001, 0.002\\)"):
        run(teacher, student, batches, steps=3, kd_stop=0, progress=False, checkpoint_dir=tmp_path, lr=2e-3)
