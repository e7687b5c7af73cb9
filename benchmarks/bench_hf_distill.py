"""Distillation loss of a Hugging Face causal LM, forward + backward through the student: time and peak
memory of ``fdiv.integrations.hf.distillation_loss(..., fused=True)`` (hidden states x lm_head, the
``[tokens, V]`` logits never materialised) against the same call with ``fused=False`` (both models'
full logits, then ``fdiv.token_loss`` on the counted rows) and against TRL's GKD loss
(``GKDTrainer.generalized_jsd_loss`` on the full shifted logits of both models with the shifted-label
mask, exactly as ``GKDTrainer.compute_loss`` calls it).

Student and teacher are small random Llama models built from ``LlamaConfig`` (no hub). One step is:
student forward, teacher forward under ``no_grad``, the loss, ``loss.backward()``. The batch has
varying prompt lengths (labels -100 on the prompt), no padding.

Divergences: ``forward_kl`` = KL(teacher || student) = TRL ``beta=0``; ``js`` with ``beta=b`` =
b KL(P || M) + (1-b) KL(Q || M), M = b P + (1-b) Q, P teacher, Q student = TRL ``beta=b`` (same
convention; checked numerically by this script before timing). All three methods reduce by the number
of counted tokens (TRL ``reduction="batchmean"`` with labels, fdiv per-token mean).

Each measurement runs in its own subprocess; peak memory is the peak RSS during the timed repetitions
minus the RSS before them (after a warm-up call, models and batch allocated, no gradients held), so it
includes the student's parameter gradients every method produces.

    python benchmarks/bench_hf_distill.py                              # V in {32000, 128256}, both divergences
    python benchmarks/bench_hf_distill.py --vocab 32000 --divergences js --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _memory import machine_line, timed_window

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

METHODS = {
    "materialised": "fdiv distillation_loss(fused=False)",
    "fused": "fdiv distillation_loss(fused=True)",
    "trl": "TRL GKDTrainer.generalized_jsd_loss",
}
DIVERGENCES = {
    # name: (fdiv registered name and parameters, TRL beta)
    "forward_kl": (("forward_kl", {}), 0.0),
    "js": (("js", {"beta": 0.5}), 0.5),
}


def build(vocab: int, hidden: int, layers: int, teacher_hidden: int, teacher_layers: int, batch: int, seq: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def config(h, n_layers):
        return LlamaConfig(
            vocab_size=vocab, hidden_size=h, intermediate_size=4 * h, num_hidden_layers=n_layers,
            num_attention_heads=max(1, h // 64), num_key_value_heads=max(1, h // 64),
            max_position_embeddings=max(2048, seq), pad_token_id=0, eos_token_id=1, tie_word_embeddings=False,
        )

    torch.manual_seed(0)
    student = LlamaForCausalLM(config(hidden, layers)).train()
    teacher = LlamaForCausalLM(config(teacher_hidden, teacher_layers)).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(2, vocab, (batch, seq), generator=g)
    prompt = torch.randint(seq // 8, seq // 4 + 1, (batch,), generator=g)  # varying prompt lengths
    labels = input_ids.clone()
    labels[torch.arange(seq)[None, :] < prompt[:, None]] = -100
    data = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    return student, teacher, data


def loss_fn(method: str, divergence: str):
    import torch

    import fdiv
    from fdiv.integrations.hf import distillation_loss

    (name, params), trl_beta = DIVERGENCES[divergence]
    if method == "trl":
        from trl.experimental.gkd.gkd_trainer import GKDTrainer

        def trl_loss(student, teacher, batch):
            # GKDTrainer.compute_loss, without the trainer around it
            s_out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            with torch.no_grad():
                t_out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            return GKDTrainer.generalized_jsd_loss(
                student_logits=s_out.logits[:, :-1, :],
                teacher_logits=t_out.logits[:, :-1, :],
                labels=batch["labels"][:, 1:],
                beta=trl_beta,
            )

        return trl_loss
    fused = method == "fused"
    div = fdiv.get(name, **params)  # the divergence is built once; parameters travel inside it
    return lambda student, teacher, batch: distillation_loss(
        student=student, teacher=teacher, batch=batch, divergence=div, fused=fused
    )


def worker(method: str, divergence: str, args) -> dict:
    import gc

    import torch

    student, teacher, batch = build(
        args.vocab_one, args.hidden, args.layers, args.teacher_hidden, args.teacher_layers, args.batch, args.seq
    )
    compute = loss_fn(method, divergence)

    def step():
        student.zero_grad(set_to_none=True)
        loss = compute(student, teacher, batch)
        loss.backward()
        return float(loss.detach())

    start = time.perf_counter()
    value = step()  # warm-up (and any compilation), outside the memory window
    warmup_ms = 1e3 * (time.perf_counter() - start)
    head = student.get_output_embeddings().weight.grad
    head_grad_norm = float(head.norm())
    embed_grad_norm = float(student.get_input_embeddings().weight.grad.norm())
    student.zero_grad(set_to_none=True)
    del head
    gc.collect()
    res = timed_window(step, args.repeats)
    return {**res, "loss": value, "warmup_ms": warmup_ms, "head_grad_norm": head_grad_norm,
            "embed_grad_norm": embed_grad_norm}


def check_conventions() -> None:
    """fdiv's divergences against TRL's generalized_jsd_loss on small logits and on a tiny Llama pair."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    import fdiv
    from fdiv.integrations.hf import distillation_loss

    torch.manual_seed(0)
    s, t = torch.randn(3, 9, 50, dtype=torch.float64) * 2, torch.randn(3, 9, 50, dtype=torch.float64) * 2
    labels = torch.randint(0, 50, (3, 9))
    labels[:, :3] = -100
    mask = labels != -100
    trl = lambda beta: float(GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta))  # noqa: E731
    lines = []
    for b in (0.2, 0.5, 0.9):
        js = fdiv.get("js", beta=b)
        ours = float(fdiv.token_loss(student_logits=s[mask], teacher_logits=t[mask], divergence=js))
        same, flipped = abs(ours - trl(b)), abs(ours - trl(1 - b))
        lines.append(f"  fdiv js beta={b}: |fdiv - TRL(beta={b})| = {same:.1e}, |fdiv - TRL(beta={1 - b:.1f})| = {flipped:.1e}")
        if not same < 1e-10:
            raise SystemExit(f"convention check failed: fdiv js beta={b} != TRL beta={b}\n" + "\n".join(lines))
    for name, beta in (("forward_kl", 0.0), ("reverse_kl", 1.0)):
        diff = abs(float(fdiv.token_loss(student_logits=s[mask], teacher_logits=t[mask], divergence=name)) - trl(beta))
        lines.append(f"  fdiv {name}: |fdiv - TRL(beta={beta:.0f})| = {diff:.1e}")
        if not diff < 1e-10:
            raise SystemExit(f"convention check failed: fdiv {name} != TRL beta={beta}\n" + "\n".join(lines))

    # the whole pipeline on a tiny Llama pair, float64: fused, materialised and TRL's compute_loss agree
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, pad_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    student = LlamaForCausalLM(cfg).double()
    teacher = LlamaForCausalLM(cfg).double().eval()
    ids = torch.randint(2, 300, (2, 12))
    lab = ids.clone()
    lab[0, :4] = lab[1, :6] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": lab}
    for divergence in DIVERGENCES:
        values, grads = {}, {}
        for method in METHODS:
            student.zero_grad(set_to_none=True)
            loss = loss_fn(method, divergence)(student, teacher, batch)
            loss.backward()
            values[method], grads[method] = float(loss.detach()), student.lm_head.weight.grad.clone()
        dloss = max(abs(v - values["trl"]) for v in values.values())
        dgrad = max(float((g - grads["trl"]).abs().max()) for g in grads.values())
        lines.append(f"  tiny Llama (fp64), {divergence}: loss {values['trl']:.6f}, max |loss - TRL| = {dloss:.1e}, "
                     f"max |d lm_head - TRL| = {dgrad:.1e}")
        if not (dloss < 1e-10 and dgrad < 1e-10):
            raise SystemExit("pipeline check failed\n" + "\n".join(lines))
    print("Convention check (fdiv vs TRL generalized_jsd_loss, same mask, per-token mean):")
    print("\n".join(lines))


def acquire_lock(path: str) -> None:
    """Wait while ``path`` exists, then create it holding our PID (atomically)."""
    waited = False
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not waited:
                print(f"waiting for {path} to disappear ...", file=sys.stderr)
                waited = True
            time.sleep(5)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        return


def release_lock(path: str) -> None:
    try:
        with open(path) as f:
            mine = f.read().strip() == str(os.getpid())
    except FileNotFoundError:
        return
    if mine:
        os.remove(path)


def run_one(method: str, divergence: str, vocab: int, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", f"{method}:{divergence}", "--vocab", str(vocab),
           "--hidden", str(args.hidden), "--layers", str(args.layers), "--teacher-hidden", str(args.teacher_hidden),
           "--teacher-layers", str(args.teacher_layers), "--batch", str(args.batch), "--seq", str(args.seq),
           "--repeats", str(args.repeats)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout > {args.timeout}s"}
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        return {"error": "killed (out of memory)" if proc.returncode in (-9, 137) else tail[0][:80]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab", default="32000,128256")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--teacher-hidden", type=int, default=None, help="default: --hidden")
    parser.add_argument("--teacher-layers", type=int, default=None, help="default: --layers")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--divergences", default=",".join(DIVERGENCES))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=600)
    parser.add_argument("--lock", default="/tmp/fdiv-bench.lock", help="wait for / hold this file while timing; '' = off")
    parser.add_argument("--skip-check", action="store_true", help="skip the convention check before timing")
    parser.add_argument("--worker", default=None)
    args = parser.parse_args()
    args.teacher_hidden = args.teacher_hidden or args.hidden
    args.teacher_layers = args.teacher_layers or args.layers
    if args.worker:
        method, divergence = args.worker.split(":")
        args.vocab_one = int(args.vocab)
        print(json.dumps(worker(method, divergence, args)))
        return

    import torch
    import transformers
    import trl

    if not args.skip_check:
        check_conventions()
    print("\n" + machine_line())
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
        f"{torch.get_num_threads()} threads, fp32, forward+backward, median of {args.repeats} after 1 warm-up"
    )
    if args.lock:
        acquire_lock(args.lock)
    try:
        for vocab in (int(v) for v in args.vocab.split(",")):
            _, _, batch = build(8, 8, 1, 8, 1, args.batch, args.seq)  # the same labels as the workers
            counted = int((batch["labels"][:, 1:] != -100).sum())
            logits_bytes = args.batch * args.seq * vocab * 4
            print(
                f"\n### V={vocab}, student H={args.hidden} x {args.layers} layers, teacher H={args.teacher_hidden} x "
                f"{args.teacher_layers} layers, batch {args.batch} x seq {args.seq} ({counted} counted tokens; "
                f"one fp32 [B, L, V] logits tensor = {logits_bytes / 2**20:.0f} MiB)\n"
            )
            print("| divergence | method | ms | x materialised | x TRL | peak extra MiB | mem / materialised "
                  "| mem / TRL | loss | lm_head grad norm |")
            print("|---|---|---|---|---|---|---|---|---|---|")
            for divergence in args.divergences.split(","):
                results = {m: run_one(m, divergence, vocab, args) for m in args.methods.split(",")}
                mat, trl_res = results.get("materialised", {}), results.get("trl", {})
                for method, res in results.items():
                    if "error" in res:
                        print(f"| {divergence} | {METHODS[method]} | {res['error']} | | | | | | | |")
                        continue

                    def ratio(ref, key, inverse=False):
                        if key not in ref or not ref[key] or not res[key]:
                            return "—"
                        return f"{(res[key] / ref[key]) if inverse else (ref[key] / res[key]):.2f}"

                    mem = res["peak_extra_bytes"]
                    print(
                        f"| {divergence} | {METHODS[method]} | {res['ms']:.0f} | {ratio(mat, 'ms')} | {ratio(trl_res, 'ms')} "
                        f"| {mem / 2**20:.0f} | {ratio(mat, 'peak_extra_bytes', True)} "
                        f"| {ratio(trl_res, 'peak_extra_bytes', True)} | {res['loss']:.6f} | {res['head_grad_norm']:.6f} |"
                    )
                    sys.stdout.flush()
    finally:
        if args.lock:
            release_lock(args.lock)


if __name__ == "__main__":
    main()
