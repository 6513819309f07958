"""From a name or a file to a ready model: the registry-aware layer above ``models``, ``policies`` and ``weights``.

``sources`` (every weight source by name, collected from the families, plus
the user's registered files), ``checkpoints`` (rebuild a checkpoint's
architecture and policy structure, then load it), ``backbone``
(:func:`~vtransfer.loading.backbone.load_backbone`: backbone name + weights
spec -> model).
"""
