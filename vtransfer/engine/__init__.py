"""Training and inference machinery: the loop and what it is built from.

``trainer`` (the fine-tuning loop, epochs, early stopping, checkpoints),
``batches`` (clip batches through a model), ``inference`` (probabilities per
clip), ``feature_cache`` (a frozen prefix's outputs computed once),
``ema``, ``mixing`` (mixup / cutmix), ``lr_decay`` (layer-wise rates),
``grad_checkpoint``.
"""
