"""Freezing policies: which of a backbone's parameters train.

A policy is a rule over the backbone's ordered layer groups
(:meth:`~vtransfer.models.base.VideoBackbone.layer_groups`):

==============  ==============================================================
``top-layer``   the new classifier only
``top-3``       the last three groups (slow fusion: FC6, FC7, classifier)
``temporal``    every parameter that mixes information across time, plus the
                classifier (ViViT: temporal transformer + head; I3D: convs
                with temporal extent > 1 and their BatchNorms; slow fusion:
                conv1-conv3)
``all``         everything, starting from the pretrained weights
``scratch``     everything, starting from random initialisation
==============  ==============================================================

The parameter-efficient policies ``bitfit``, ``lora``, ``adapter`` and
``attentive-probe`` (:data:`PEFT_POLICY_NAMES`) are described in
:mod:`vtransfer.policies.peft`; the last three add modules to the model, so
:func:`vtransfer.policies.peft.prepare_model_for_policy` runs before
:func:`resolve_policy`, and the plan records the structure it added.

A custom set (``--train spatial*,temporal*``) names groups or glob patterns
over group names. The freshly initialised classifier always trains: a random
head left frozen would make the run meaningless.

Frozen parameters get ``requires_grad=False``. :func:`set_train_mode` puts
every fully frozen module in eval mode (BatchNorm statistics stay fixed,
dropout is off), and the training loop runs the frozen groups below
:attr:`PolicyPlan.first_trainable_group` without autograd.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from torch import nn

from vtransfer.models.base import VideoBackbone
from vtransfer.models.structured import structure_of
from vtransfer.policies.names import (
    ALL_POLICY_NAMES,
    FREEZING_POLICY_NAMES,
    STRUCTURAL_POLICIES,
)
from vtransfer.policies.peft import PolicyOptions, bitfit_params, prepare_model_for_policy, structure_params
from vtransfer.utils.errors import ConfigError

CUSTOM_POLICY = "custom"


@dataclass
class PolicyPlan:
    """What a policy trains on one model.

    Attributes:
        policy: policy name (``custom`` for a ``--train`` set).
        trainable: names of the parameters that train, in model order.
        trainable_groups: names of the groups with at least one trainable parameter.
        first_trainable_group: index of the first such group; groups before it
            are entirely frozen and can run without autograd (or be cached).
        reinit: ``True`` for ``scratch``: start from random weights.
        train_patterns: the ``--train`` patterns of a custom policy.
        structure: what policy-time surgery added to the model (``None`` for a
            plain model); checkpoints store it so loading can redo it.
    """

    policy: str
    trainable: list[str]
    trainable_groups: list[str]
    first_trainable_group: int
    reinit: bool = False
    train_patterns: list[str] = field(default_factory=list)
    structure: dict | None = None

    def trainable_count(self, model: nn.Module) -> int:
        """Number of scalar parameters that train."""
        names = set(self.trainable)
        return sum(p.numel() for n, p in model.named_parameters() if n in names)

    def to_dict(self) -> dict:
        """JSON-serialisable summary (parameter names omitted)."""
        return {
            "policy": self.policy,
            "trainable_groups": list(self.trainable_groups),
            "first_trainable_group": self.first_trainable_group,
            "reinit": self.reinit,
            "train_patterns": list(self.train_patterns),
            "structure": dict(self.structure) if self.structure else None,
        }


def _match_groups(names: list[str], patterns: list[str]) -> list[str]:
    matched: list[str] = []
    for pat in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise ConfigError(f"--train: {pat!r} matches no layer group; valid groups: {', '.join(names)}")
        matched.extend(h for h in hits if h not in matched)
    return matched


def resolve_policy(model: VideoBackbone, policy: str, train_groups: list[str] | None = None) -> PolicyPlan:
    """Work out which parameters of ``model`` train under ``policy``.

    ``train_groups`` (names or glob patterns) selects a custom set and takes
    precedence over ``policy``. Raises :class:`ConfigError` for an unknown
    policy, a pattern matching no group, or a policy that trains nothing but
    the classifier when it promises more (``temporal`` on a backbone with no
    temporal parameters), and for ``lora``, ``adapter`` or ``attentive-probe``
    on a model :func:`~vtransfer.policies.peft.prepare_model_for_policy` did
    not prepare for it.
    """
    groups = model.layer_groups()
    names = [g.name for g in groups]
    head = groups[-1]
    patterns = [p.strip() for p in (train_groups or []) if p.strip()]

    if patterns:
        chosen = set(_match_groups(names, patterns)) | {head.name}
        trainable = [p for g in groups if g.name in chosen for p in g.params]
        policy_name = CUSTOM_POLICY
    elif policy in ("all", "scratch"):
        trainable = [p for g in groups for p in g.params]
        policy_name = policy
    elif policy == "top-layer":
        trainable = list(head.params)
        policy_name = policy
    elif policy == "top-3":
        trainable = [p for g in groups[-3:] for p in g.params]
        policy_name = policy
    elif policy == "temporal":
        temporal = [p for g in groups[:-1] for p in g.temporal_params]
        if not temporal:
            why = getattr(model, "no_temporal_reason", None)
            others = ", ".join(p for p in FREEZING_POLICY_NAMES if p != "temporal")
            raise ConfigError(
                f"policy 'temporal': backbone {model.backbone_name!r} with this configuration has no "
                f"parameters that mix information across time{' alone (' + why + ')' if why else ''}; "
                f"use one of {others} (or --train GROUPS)"
            )
        trainable = temporal + list(head.params)
        policy_name = policy
    elif policy == "bitfit":
        trainable = bitfit_params(model) + list(head.params)
        policy_name = policy
    elif policy in STRUCTURAL_POLICIES:
        trainable = structure_params(model, policy) + list(head.params)
        policy_name = policy
    else:
        raise ConfigError(f"unknown policy {policy!r}; choose one of: {', '.join(ALL_POLICY_NAMES)} (or --train GROUPS)")

    trainable_set = set(trainable)
    order = [n for n, _ in model.named_parameters()]
    trainable = [n for n in order if n in trainable_set]
    if not trainable:
        raise ConfigError(f"policy {policy_name!r} trains no parameters; valid groups: {', '.join(names)}")
    trainable_groups = [g.name for g in groups if trainable_set.intersection(g.params)]
    first = names.index(trainable_groups[0])
    return PolicyPlan(
        policy=policy_name,
        trainable=trainable,
        trainable_groups=trainable_groups,
        first_trainable_group=first,
        reinit=(policy_name == "scratch"),
        train_patterns=patterns,
        structure=structure_of(model),
    )


def plan_policy(
    model: VideoBackbone,
    policy: str,
    options: PolicyOptions | None = None,
    train_groups: list[str] | None = None,
) -> tuple[VideoBackbone, PolicyPlan]:
    """:func:`~vtransfer.policies.peft.prepare_model_for_policy` then :func:`resolve_policy`: the model and its plan.

    The one call the run pipeline, ``compare-policies`` and ``inspect`` need
    for every policy. A custom ``train_groups`` set adds nothing to the model.
    Raises :class:`ConfigError` for bad options or a policy that does not fit
    the backbone, before any data is read.
    """
    if not any(p.strip() for p in train_groups or []):
        model = prepare_model_for_policy(model, policy, options)
    return model, resolve_policy(model, policy, train_groups)


def apply_policy(model: nn.Module, plan: PolicyPlan) -> None:
    """Set ``requires_grad`` so that exactly ``plan.trainable`` train."""
    trainable = set(plan.trainable)
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)


def frozen_modules(model: nn.Module) -> list[nn.Module]:
    """Outermost submodules that own parameters and have none that train."""
    out: list[nn.Module] = []
    covered: set[str] = set()
    for name, module in model.named_modules():
        if not name or any(name.startswith(c + ".") for c in covered):
            continue
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            out.append(module)
            covered.add(name)
    return out


# Policies that train normalisation layers' scale and shift but keep their running statistics: BitFit's premise is
# the pretrained network's function with only those parameters changed, and batches of 8 clips re-estimating every
# BatchNorm's statistics made its validation jump between 0.33 and 0.89 from epoch to epoch on real_actions.
KEEPS_NORM_STATISTICS = ("bitfit",)


def set_train_mode(model: nn.Module, training: bool = True, policy: str | None = None) -> None:
    """``model.train(training)``, then fully frozen submodules back to eval mode.

    Keeps frozen BatchNorm statistics fixed and frozen dropout off, so frozen
    layers compute the same function in training and evaluation. Dropout
    modules own no parameters: those a layer group applies (its ``modules``)
    follow the group, eval mode when none of its parameters train. Under a
    ``policy`` of :data:`KEEPS_NORM_STATISTICS` every BatchNorm stays in eval
    mode too: its scale and shift train, its running statistics stay.
    """
    model.train(training)
    if training:
        for module in frozen_modules(model):
            module.eval()
        if policy in KEEPS_NORM_STATISTICS:
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        for group in getattr(model, "layer_groups", lambda: [])():
            if not trainable.intersection(group.params):
                for name in group.modules:
                    model.get_submodule(name).eval()
