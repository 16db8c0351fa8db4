"""Shared training pieces: the pretraining, fine-tuning and alignment recipes all import these.

    optim      AdamW with weight-decay parameter groups
    schedule   learning-rate warm-up then cosine / linear decay (pure functions)
    data       memory-mapped token shards, `prepare`, a resumable per-rank loader
    loop       one optimiser step (accumulation, clipping, autocast), evaluation, metrics, plots
    checkpoint resumable training state (atomic, keep the last K)
    dist       torchrun: DDP / FSDP2 wrapping, rank helpers
    mfu        model FLOPs utilisation against a measured (CPU) or known (CUDA) peak
    plan       compute / memory planner (`llmkit plan`)
"""
