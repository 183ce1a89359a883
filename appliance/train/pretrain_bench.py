"""2D encoder rows of `rfm bench train`: pre-training images/s per objective, forward-only
inference images/s, peak GPU memory and peak RSS, each (encoder, objective) in a fresh process on
random images; and the planner's plan for ViT-B/14 at 518 px on a 24 GB and an 80 GB card.

CPU: the tiny ViT at 128 px. GPU: ViT-B/14 (RAD-DINO's shape, random weights) at 518 px with the
plan for the card found (and, with `emulate_gb`, for a card of that size, allocator capped to it).
"""

from __future__ import annotations

import time
from dataclasses import replace

CPU_ENCODER = ("tiny", "vit_tiny", 128)
GPU_ENCODER = ("timm", "vit_base_patch14_dinov2", 518)
OBJECTIVES = ("clip", "unicl", "dino")
PLAN_CARDS_GB = (24, 80)
BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)


def _model(objective: str, family: str, name: str, size: int, bert_base: bool):
    from transformers import BertConfig, BertModel

    from appliance.config import PretrainSection
    from appliance.models.encoders2d import EncoderSpec2D, build_image_encoder
    from appliance.models.greenrfm import build_text_encoder
    from appliance.train.pretrain import ContrastiveModel, DinoModel

    cfg = PretrainSection(objective=objective)
    encoder = build_image_encoder(EncoderSpec2D(family, name, None, size))
    if objective == "dino":
        return cfg, encoder, None, DinoModel(encoder, cfg.dino)
    text = BertModel(BertConfig(vocab_size=30522, **BERT_BASE), add_pooling_layer=False) if bert_base \
        else build_text_encoder(None, 3000)
    return cfg, encoder, text, ContrastiveModel(encoder, text, cfg.embed_dim, cfg.temperature)


def _batch(objective: str, n: int, size: int, local_size: int, local_crops: int, tokens: int, generator) -> dict:
    import torch

    out = {"index": torch.arange(n)}
    if objective == "dino":
        out["global"] = torch.rand(n, 2, 1, size, size, generator=generator)
        if local_crops:
            out["local"] = torch.rand(n, local_crops, 1, local_size, local_size, generator=generator)
        return out
    out["image"] = torch.rand(n, 1, size, size, generator=generator)
    out["report_ids"] = torch.randint(5, 2999, (n, tokens), generator=generator)
    out["report_mask"] = torch.ones(n, tokens, dtype=torch.long)
    if objective == "unicl":
        out["label_ids"] = torch.randint(5, 2999, (n, 16), generator=generator)
        out["label_mask"] = torch.ones(n, 16, dtype=torch.long)
        out["label_id"] = torch.randint(0, max(2, n // 4), (n,), generator=generator)
    return out


def _measure(objective: str, family: str, name: str, size: int, steps: int, warmup: int, device: str,
             emulate_gb: float | None, queue) -> None:
    """Child process: optimiser steps of one objective at the plan's micro-batch (one micro-batch a
    step), then forward-only inference."""
    import torch

    from appliance.bench import _peak_rss_mb
    from appliance.hardware import detect_hardware, plan_pretraining
    from appliance.progress import SilentProgress
    from appliance.train.pretrain import _param_groups, _PretrainRun, _workload
    from appliance.train.pretrain_data import local_crop_size

    cuda = torch.cuda.is_available() and device != "cpu"
    cfg, encoder, text, model = _model(objective, family, name, size, bert_base=cuda)
    hw = detect_hardware(".")
    workload = _workload(encoder, size, cfg, text)
    if cuda:
        total_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
        card_gb = emulate_gb or round(total_gb, 1)
        if emulate_gb:
            torch.cuda.set_per_process_memory_fraction(min(1.0, emulate_gb / total_gb))
        plan = plan_pretraining(hw, "auto", workload, vram_gb=card_gb)
    else:
        plan = plan_pretraining(hw, "cpu", workload)
        plan = replace(plan, micro_batch=8, grad_accumulation=1)
    plan = replace(plan, grad_accumulation=1)  # a timed step = one micro-batch
    encoder.set_activation_checkpointing(plan.activation_checkpointing)
    job = _PretrainRun(cfg, plan, None, SilentProgress(), None, model, None, None, None)
    optimizer = torch.optim.AdamW(_param_groups(job.model, cfg), lr=cfg.lr)
    local_size = local_crop_size(size, cfg.dino.local_size_fraction, encoder.patch_size or 1)
    g = torch.Generator().manual_seed(0)
    batch = _batch(objective, plan.micro_batch, size, local_size, cfg.dino.local_crops, 128 if cuda else 64, g)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        job.step(batch, optimizer)
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        job.step(batch, optimizer)
    if cuda:
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    peak_train = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    encoder.eval()
    images = torch.rand(plan.micro_batch, 1, size, size, generator=g).to(job.device)
    with torch.no_grad(), job.autocast():
        for _ in range(max(1, warmup)):
            encoder(images)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            encoder(images)
        if cuda:
            torch.cuda.synchronize()
        infer_s = time.perf_counter() - t0
    n = plan.micro_batch * steps
    queue.put({"objective": objective, "encoder": name, "family": family, "image_size": size,
               "parameters_m": round(sum(p.numel() for p in encoder.parameters()) / 1e6, 2),
               "plan": plan.to_dict(), "train_images_per_s": n / train_s, "inference_images_per_s": n / infer_s,
               "peak_gpu_mem_gb": peak_train, "peak_rss_mb": _peak_rss_mb(), "oom_backoffs": job.oom_backoffs,
               "gpu": torch.cuda.get_device_name(0) if cuda else None})


def recipe_plans() -> list[dict]:
    """The planner's plan for ViT-B/14 at 518 px (RAD-DINO), per objective, on 24 and 80 GB cards."""
    from appliance.config import PretrainSection
    from appliance.hardware import PretrainWorkload, detect_hardware, plan_pretraining

    hw = detect_hardware(".")
    vit_b = dict(image_params=86_580_480, depth=12, width=768, global_tokens=(518 // 14) ** 2 + 1)
    rows = []
    for objective in OBJECTIVES:
        cfg = PretrainSection(objective=objective)
        local = int(round(518 * cfg.dino.local_size_fraction)) // 14
        text = {} if objective == "dino" else dict(text_params=109_482_240, text_tokens=cfg.text_max_tokens,
                                                    text_depth=12, text_width=768,
                                                    texts_per_sample=2 if objective == "unicl" else 1)
        workload = PretrainWorkload(objective, **vit_b, local_tokens=local * local + 1,
                                    local_views=cfg.dino.local_crops if objective == "dino" else 0,
                                    effective_batch=cfg.batch_size, **text)
        for gb in PLAN_CARDS_GB:
            plan = plan_pretraining(hw, "auto", workload, vram_gb=gb)
            rows.append({"objective": objective, "card_gb": gb, "micro_batch": plan.micro_batch,
                         "grad_accumulation": plan.grad_accumulation, "effective_batch": plan.effective_batch,
                         "activation_checkpointing": plan.activation_checkpointing, "precision": plan.precision,
                         "reasons": plan.reasons})
    return rows


def bench_pretrain(steps: int = 3, warmup: int = 1, device: str = "auto", emulate_gb: float | None = None,
                   objectives=OBJECTIVES, image_size: int | None = None) -> dict:
    """One row per objective (see the module docstring); `image_size` overrides the encoder's."""
    import torch

    from appliance.bench import _in_child

    cuda = torch.cuda.is_available() and device != "cpu"
    family, name, size = GPU_ENCODER if cuda else CPU_ENCODER
    size = image_size or size
    rows = [_in_child(_measure, objective, family, name, size, steps, warmup, device, emulate_gb)
            for objective in objectives]
    notes = [f"{name} at {size} px, random weights; a step = one micro-batch of random images (and random report "
             f"tokens), {steps} timed after {warmup} warm-up; images/s = images of the timed steps / wall time",
             "dino: 2 global crops + local crops per image through the student, the 2 global crops through the "
             "EMA teacher; images/s counts images, not crops",
             "inference = forward-only encoder (the pooled embedding) at the micro-batch, in the plan's precision",
             "plan rows: appliance.hardware.plan_pretraining for ViT-B/14 at 518 px (RAD-DINO) with CXR-BERT-sized "
             "text, effective batch 64 (pretrain.batch_size), on a 24 GB and an 80 GB card"]
    if not cuda:
        notes.append("CPU: fp32, micro-batch 8, the tiny 4-block ViT; ViT-B/14 at 518 px is measured on a GPU")
    return {"stage": "pretrain", "device": "cuda" if cuda else "cpu", "rows": rows, "plans": recipe_plans(),
            "notes": notes}
