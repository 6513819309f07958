"""Which parameters train: the papers' freezing policies and the parameter-efficient ones.

``names`` (every policy name, spelled once; torch-free), ``freezing``
(scratch, top-layer, top-3, temporal, all, and ``--train GROUPS``; resolving a
policy into a plan), ``peft`` (bitfit, adapter, attentive-probe, and the
structure a checkpoint records), ``lora`` (LoRA through Hugging Face peft). To
add a policy: its name in ``names``, its plan in ``freezing`` or ``peft``.
"""
