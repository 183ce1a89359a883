"""`rfm bench distill`: what the distill stage costs and what the Lite student saves.

- Task heads: training samples/s of each kind of head on random tokens of the given shape, and what
  report-privileged distillation costs on top of the image-only head (teacher + student against the
  head alone), measured in the same run.
- Full -> Lite encoder: samples/s of the production distillation step (`distillation_step`) for a
  random GreenRFM teacher and its GreenRFM-L student, and the peer figure: forward-only volumes/s of
  the student's image encoder against the teacher's, with operations per volume.

Each part runs in a fresh process, so its peak memory is its own.
"""

from __future__ import annotations

import platform
import time
from contextlib import nullcontext

from appliance.bench import BENCH_FINDINGS, DEMO_CROP, _in_child, _peak_rss_mb

# The demo's frozen GreenRFM-L tokens: 8 image tokens of 512, 192 report tokens of the tiny BERT's 128.
DEMO_TOKENS = {"n_train": 300, "n_val": 40, "image_tokens": 8, "image_dim": 512, "text_tokens": 192, "text_dim": 128}
HEAD_KINDS = ("linear_probe", "attention_head", "teacher_text", "student")


def _measure_heads(shape: dict, epochs: int, queue) -> None:
    import torch

    from appliance.distill.heads import HeadConfig, TokenSet, _fresh, teacher_targets, train_head

    torch.manual_seed(0)

    def tokens(n: int) -> TokenSet:
        mask = torch.ones(n, shape["text_tokens"], dtype=torch.bool)
        return TokenSet(torch.randn(n, shape["image_tokens"], shape["image_dim"]),
                        torch.randn(n, shape["text_tokens"], shape["text_dim"]), mask, torch.randint(0, 2, (n,)))

    train, val = tokens(shape["n_train"]), tokens(shape["n_val"])
    cfg = HeadConfig(max_epochs=epochs, patience=epochs + 1)  # no early stop: every head runs all epochs
    soft = torch.softmax(torch.randn(len(train), 2), dim=-1)
    rows = {}
    for kind in HEAD_KINDS:
        model = _fresh({"linear_probe": "probe", "teacher_text": "teacher"}.get(kind, "head"), train, 2, cfg, 0)
        t0 = time.perf_counter()
        train_head(model, train, val, cfg, 0, soft_targets=soft if kind == "student" else None,
                   uses_text=kind == "teacher_text")
        if kind == "teacher_text":
            teacher_targets(model, train, cfg.tau, uses_text=True)  # what the student then learns from
        seconds = time.perf_counter() - t0
        rows[kind] = {"seconds": seconds, "epochs": epochs, "train_samples_per_s": epochs * len(train) / seconds,
                      "parameters": sum(p.numel() for p in model.parameters())}
    distilled = rows["teacher_text"]["seconds"] + rows["student"]["seconds"]
    queue.put({"shape": shape, "threads": torch.get_num_threads(), "heads": rows,
               "report_distilled_vs_image_only_cost": distilled / rows["attention_head"]["seconds"],
               "peak_rss_mb": _peak_rss_mb()})


def _measure_encoder(crop: tuple, batch: int, steps: int, warmup: int, device: str, queue) -> None:
    import torch

    from appliance.distill.encoder import _image_encoder, _profile, build_student, distillation_step, inference_speed
    from appliance.models import ModelSpec, build_greenrfm

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    teacher = build_greenrfm(ModelSpec(variant="standard", n_classes=BENCH_FINDINGS, text_vocab_size=1000))
    teacher = teacher.to(dev).eval().requires_grad_(False)
    student = build_student(teacher).to(dev)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    bf16 = cuda and torch.cuda.is_bf16_supported()
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else nullcontext
    x, y, z = crop
    volume = torch.rand(batch, 1, z, y, x, device=dev) * 2 - 1
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    student.vision.train()
    for i in range(warmup + steps):
        if i == warmup:
            if cuda:
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
        distillation_step(teacher, student, volume, optimizer, params, amp=amp)
    if cuda:
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    step = {"batch": batch, "steps": steps, "seconds": seconds, "samples_per_s": steps * batch / seconds,
            "peak_gpu_mem_gb": torch.cuda.max_memory_allocated(dev) / 2 ** 30 if cuda else None}
    student.eval()
    sizes = sorted({1, batch})
    encoders = {"teacher": _image_encoder(teacher), "student": _image_encoder(student)}
    speed = {name: inference_speed(enc, crop, sizes, dev, warmup=warmup, iterations=max(steps, 3), autocast=amp)
             for name, enc in encoders.items()}
    profile = {name: _profile(enc, crop, dev) for name, enc in encoders.items()}
    queue.put({"crop": list(crop), "device": dev.type, "precision": "bf16" if bf16 else "fp32",
               "threads": torch.get_num_threads(),
               "distillation_step": step, "inference": speed, "profile": profile,
               "student_speedup": {str(b): speed["student"][str(b)]["volumes_per_s"]
                                   / speed["teacher"][str(b)]["volumes_per_s"] for b in sizes},
               "gmacs_ratio": profile["student"]["gmacs_per_volume"] / profile["teacher"]["gmacs_per_volume"],
               "peak_rss_mb": _peak_rss_mb()})


def bench_distill(crop: tuple = DEMO_CROP, batch: int = 8, steps: int = 3, warmup: int = 1, head_epochs: int = 20,
                  shape: dict | None = None, device: str = "auto") -> dict:
    """Task-head training and full -> Lite encoder distillation, each in a fresh process; JSON-able."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = {**DEMO_TOKENS, **(shape or {})}
    heads = _in_child(_measure_heads, shape, head_epochs)
    encoder = _in_child(_measure_encoder, tuple(crop), batch, steps, warmup, device)
    return {"device": device, "torch": torch.__version__, "machine": platform.machine(), "heads": heads,
            "encoder": encoder,
            "notes": [
                f"heads: {head_epochs} epochs each on random tokens ({shape['n_train']} training studies, "
                f"{shape['image_tokens']}x{shape['image_dim']} image and {shape['text_tokens']}x{shape['text_dim']} "
                "report tokens), batch 64, validation every epoch; the teacher row includes its soft targets",
                "report-distilled vs image-only cost = (teacher + student seconds) / attention-head seconds, per seed "
                "and target; the encoder runs once for all of them (not timed here: it is `rfm eval`'s encode pass)",
                f"encoder: random GreenRFM teacher and its teacher-initialised GreenRFM-L student, batch {batch}, "
                f"{steps} timed distillation steps after {warmup} warm-up step(s), volumes already on the device",
                "student speed-up = forward-only image-encoder volumes/s of GreenRFM-L / GreenRFM (median of timed "
                "calls after warm-up), per batch size",
            ]}
