"""Training and inference machinery: the loop and what it is built from.

``trainer`` (the fine-tuning loop, epochs, early stopping, checkpoints),
``batches`` (clip batches through a model), ``inference`` (probabilities per
clip), ``feature_cache`` (a frozen prefix's outputs computed once),
``spill`` (a store's rows in memory or, past ``--max-memory``, in a memory-mapped
file), ``step_memory`` (one training step measured against the memory budget:
a micro-batch or gradient checkpointing when it would not fit),
``ema``, ``mixing`` (mixup / cutmix), ``lr_decay`` (layer-wise rates),
``grad_checkpoint``.
"""
