"""The training stages: the shared trainer set-up (train, batching, preemption, loss_rows) and each
stage's code: sft, dpo (and dpkd), simpo, gkd, distill with its losses and the top-k store.
"""
