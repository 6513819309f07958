"""The backbones: the layer-group contract and one module per family.

``base`` holds the contract (:class:`~vtransfer.models.base.VideoBackbone`,
layer groups tagged spatial / temporal / head); ``registry`` maps backbone
names to family modules. A family module (``i3d``, ``slowfusion``, ``vivit``,
``effnet3d``, ``c3d``, ``tv_*``, ``hf_video``) declares everything about
itself: the model class, presets, training defaults, ``WEIGHT_SOURCES`` and
``FOREIGN_LAYOUTS`` (its pretrained weights), and where the
parameter-efficient policies go in (``adapter_sites``, ``probe_tap``,
``LORA_TARGETS``; see ``peft_sites``). To add a family: a new module here and
one line in ``registry``.
"""
