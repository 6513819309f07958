"""Weight files: the checkpoint format, downloads, and converters from foreign layouts. Knows no model registry.

``checkpoint`` (vtransfer's safetensors + metadata format; reading foreign
state dicts without unpickling), ``source`` (the :class:`WeightSource` and
:class:`ForeignLayout` declarations families use), ``hub`` (download, cache,
sha256, the offline message), ``flax_msgpack`` (Flax checkpoints without JAX),
``keymatch``, and the converters: ``inflate`` (2D to 3D), ``effnet_lite``,
``i3d_port``, ``vit_init``, ``vit_pytorch_import``, ``hf_vivit``,
``scenic_vivit``, ``torchvision_video``.
"""
