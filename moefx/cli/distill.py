"""`moefx distill`: a PR-MoE teacher, its MoS student, staged KD on the offline corpus (one process)."""
from __future__ import annotations

from ..errors import MoefxError
from ..fileio import write_atomic
from ..outputs import main_tensor
from .common import load_plan, model_args


def cmd_distill(args) -> int:
    """Convert MODEL into the plan's PR-MoE teacher, shrink it to the plan's student, run staged KD
    on the offline stdlib corpus and save the student's state dict."""
    import torch

    from ..convert import convert
    from ..data import fixed_eval_batches, lm_batches, load_corpus
    from ..train.distill import distill
    from ..models import load_model
    from ..passes.shrink import shrink

    plan = load_plan(args.plan)
    if plan.student is None:
        raise MoefxError(f"moefx distill needs a plan with a [student] section (layers, depth or keep); "
                         f"{args.plan or 'the default plan'} has none")
    model, inputs = load_model(args.model, seed=args.seed, batch=args.batch, seq=args.seq)
    teacher_plan = type(plan)(moe=plan.moe, lowering=plan.lowering)
    teacher = convert(model, teacher_plan, inputs)
    student = shrink(teacher, plan)
    vocab = main_tensor(teacher(*inputs)).shape[-1]
    train, val = load_corpus(max_bytes=args.corpus_bytes, seed=args.seed)
    train, val = train.clamp_max(vocab - 1), val.clamp_max(vocab - 1)  # byte ids into the model's vocabulary
    batches = lm_batches(train, args.batch, args.seq, args.steps, seed=args.seed)
    evals = fixed_eval_batches(val, args.batch, args.seq, 4)
    if args.kd_stop is None:
        kd_stop = round(0.6 * args.steps)          # staged KD: on for the first 60% of the steps
    else:
        kd_stop = args.kd_stop if args.kd_stop >= 0 else None
        if kd_stop is not None and kd_stop > args.steps:
            raise MoefxError(f"--kd-stop {kd_stop} is past --steps {args.steps}: use a step <= {args.steps}, "
                             "or --kd-stop -1 to keep KD on for the whole run")
    result = distill(teacher, student, batches, steps=args.steps, kd_stop=kd_stop, kd_alpha=args.kd_alpha,
                     temperature=args.temperature, lr=args.lr, eval_batches=evals, progress=True,
                     checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every, seed=args.seed)
    kept = student.meta.get("moefx_student_keep")
    print(f"student keeps teacher blocks {kept}; final eval loss {result.final_eval_loss:.4f} "
          f"(teacher {result.teacher_eval_loss if result.teacher_eval_loss is not None else float('nan'):.4f})")
    if args.output:
        import io

        buf = io.BytesIO()
        torch.save(student.state_dict(), buf)
        write_atomic(args.output, buf.getvalue())
        print(f"wrote {args.output}")
    return 0




def add_parsers(sub) -> None:
    ds = sub.add_parser("distill", help="shrink a PR-MoE teacher into a MoS student and train it with staged KD")
    model_args(ds, default="gpt2-tiny")
    ds.add_argument("--steps", type=int, default=100, help="optimizer steps")
    ds.add_argument("--kd-stop", type=int, default=None,
                    help="step at which KD switches off (-1: never; default: 60%% of --steps)")
    ds.add_argument("--kd-alpha", type=float, default=1.0, help="weight of the KD term")
    ds.add_argument("--temperature", type=float, default=1.0, help="KD temperature")
    ds.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate")
    ds.add_argument("--batch", type=int, default=8, help="sequences per step")
    ds.add_argument("--seq", type=int, default=32, help="tokens per sequence")
    ds.add_argument("--corpus-bytes", type=int, default=400_000, help="bytes of the offline corpus to use")
    ds.add_argument("--checkpoint-dir", help="write resumable checkpoints here (atomically)")
    ds.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints")
    ds.add_argument("--output", "-o", help="save the student's state dict here")
    ds.set_defaults(func=cmd_distill)
