"""Parameter-efficient policies: the model surgery they need, their options, and redoing it on load.

==================  ==========================================================
``bitfit``          biases and normalisation parameters (LayerNorm/BatchNorm
                    scale and shift), plus the classifier (Ben Zaken et al.
                    2022). No surgery.
``lora``            low-rank updates of the attention/MLP linears (ViViT) or
                    ungrouped convs (CNNs), through Hugging Face ``peft``
                    (:mod:`vtransfer.policies.lora`), plus the classifier. ``merge``
                    folds them into the weights at the end.
``adapter``         ST-Adapters (:mod:`vtransfer.models.st_adapter`) before
                    every spatial block of the factorised ViViT, after every
                    stage of effnet3d and every Inception block of I3D but
                    the pooled last one, plus the classifier: a frozen image
                    model learns time.
``attentive-probe`` a learned-query cross-attention pooling
                    (:mod:`vtransfer.models.attentive_probe`) over the last
                    feature map *before* the family's global pooling, plus
                    the classifier; the backbone stays frozen and is served
                    by the frozen-prefix feature cache.
==================  ==========================================================

The run pipeline calls :func:`prepare_model_for_policy` after building the
model (pretrained weights loaded) and before
:func:`vtransfer.policies.freezing.resolve_policy`; bad options and policies that do
not fit the backbone raise :class:`~vtransfer.utils.errors.ConfigError` there,
before any data is read. The surgery is recorded on the model
(:func:`vtransfer.models.structured.structure_of`), saved in checkpoints and
redone by :func:`restore_structure` when one is loaded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from vtransfer.models.attentive_probe import AttentiveProbe
from vtransfer.models.base import VideoBackbone
from vtransfer.models.registry import backbone_module, backbone_names, family_module
from vtransfer.models.st_adapter import STAdapter
from vtransfer.models.structured import GroupEdits, make_structured, remove_structure, structure_of
from vtransfer.policies import lora
from vtransfer.policies.lora import lora_param_names
from vtransfer.policies.names import STRUCTURAL_POLICIES
from vtransfer.run_config import PolicyConfig
from vtransfer.utils.errors import ConfigError

NORM_TYPES = tuple(t for t in (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None)) if t)
ADAPTER_PREFIX = "st_adapters"
PROBE_MODULE = "attentive_probe"


@dataclass(frozen=True)
class PolicyOptions:
    """Options of the parameter-efficient policies (each ignored by the policies it does not concern).

    Attributes:
        lora_rank: rank ``r`` of each LoRA update.
        lora_alpha: LoRA scale numerator: the update is ``(alpha / r) B A``.
        lora_targets: layer names, name suffixes or glob patterns over module
            names to adapt; ``None``: the family default (ViViT: ``qkv``,
            ``proj``, ``fc1``, ``fc2`` of every block; others: every Linear
            and ungrouped conv outside the classifier).
        lora_dropout: dropout on the LoRA branch's input.
        merge: fold the LoRA updates into the weights when training ends.
        adapter_ratio: ST-Adapter bottleneck width as a fraction of the
            channels where it sits (0.5: the paper's 384 for ViT-B's 768).
        probe_heads: attention heads of the attentive probe.
        probe_dim: attention width of the probe (``None``: the feature width).
    """

    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] | None = None
    lora_dropout: float = 0.0
    merge: bool = False
    adapter_ratio: float = 0.5
    probe_heads: int = 8
    probe_dim: int | None = None

    def validate(self, policy: str | None = None) -> "PolicyOptions":
        """Raise :class:`ConfigError` naming the valid values of the first bad option; return ``self``."""
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 1:
            raise ConfigError(f"--lora-rank must be an integer >= 1 (e.g. 4, 8, 16), got {self.lora_rank!r}")
        if not self.lora_alpha > 0:
            raise ConfigError(f"--lora-alpha must be > 0 (the update is scaled by alpha / rank), got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout!r}")
        targets = self.lora_targets
        if targets is not None and (not targets or not all(isinstance(t, str) and t.strip() for t in targets)):
            raise ConfigError(f"--lora-targets must name at least one layer (e.g. qkv,fc1), got {targets!r}")
        if not 0.0 < self.adapter_ratio <= 1.0:
            raise ConfigError(f"--adapter-ratio must be in (0, 1] (a fraction of the channels), got {self.adapter_ratio!r}")
        if isinstance(self.probe_heads, bool) or not isinstance(self.probe_heads, int) or self.probe_heads < 1:
            raise ConfigError(f"--probe-heads must be an integer >= 1, got {self.probe_heads!r}")
        dim = self.probe_dim
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1 or dim % self.probe_heads):
            raise ConfigError(f"--probe-dim must be a positive multiple of --probe-heads ({self.probe_heads}), got {dim!r}")
        if self.merge and policy is not None and policy != "lora":
            raise ConfigError(f"--merge folds LoRA updates into the weights: it applies to --policy lora only, not {policy!r}")
        return self

    @classmethod
    def from_config(cls, config: PolicyConfig) -> "PolicyOptions":
        """The options a run's policy section asks for."""
        return cls(lora_rank=config.lora_rank, lora_alpha=config.lora_alpha,
                   lora_targets=tuple(config.lora_targets) if config.lora_targets is not None else None,
                   lora_dropout=config.lora_dropout, merge=config.merge, adapter_ratio=config.adapter_ratio,
                   probe_heads=config.probe_heads, probe_dim=config.probe_dim)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable options (``lora_targets`` as a list)."""
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets) if self.lora_targets is not None else None
        return d


# -- the surgery ----------------------------------------------------------------------------


def prepare_model_for_policy(model: VideoBackbone, policy: str, options: PolicyOptions | None = None) -> VideoBackbone:
    """Add what ``policy`` needs to ``model`` (in place) and return it; other policies leave it unchanged.

    Call after the pretrained weights are loaded (and ``reset_classifier``)
    and before :func:`vtransfer.policies.freezing.resolve_policy`. The added modules
    live on the device and dtype of the model's parameters.

    Raises:
        ConfigError: a bad option, or a policy that does not apply to this backbone (naming the valid choices).
    """
    options = (options or PolicyOptions()).validate(policy)
    if policy == "lora":
        return add_lora(model, rank=options.lora_rank, alpha=options.lora_alpha, dropout=options.lora_dropout,
                        targets=list(options.lora_targets) if options.lora_targets is not None else None)
    if policy == "adapter":
        return insert_adapters(model, ratio=options.adapter_ratio)
    if policy == "attentive-probe":
        return attach_probe(model, heads=options.probe_heads, attn_dim=options.probe_dim)
    return model


def restore_structure(model: VideoBackbone, structure: dict[str, Any] | None) -> VideoBackbone:
    """Redo on a freshly built ``model`` the surgery ``structure`` (from :func:`structure_of`) records."""
    if not structure:
        return model
    kind = structure.get("kind")
    if kind == "lora":
        return add_lora(model, rank=int(structure["rank"]), alpha=float(structure["alpha"]),
                        dropout=float(structure.get("dropout", 0.0)), targets=list(structure["targets"]), exact=True)
    if kind == "adapter":
        return insert_adapters(model, ratio=float(structure["ratio"]), sites=list(structure["sites"]))
    if kind == "attentive-probe":
        return attach_probe(model, heads=int(structure["heads"]), attn_dim=int(structure["attn_dim"]))
    raise ConfigError(f"unknown model structure {kind!r}; this vtransfer knows {', '.join(STRUCTURAL_POLICIES)}")


def _reference(model: VideoBackbone) -> torch.Tensor:
    return next(model.parameters())


def _group_index(model: VideoBackbone) -> dict[str, int]:
    return {g.name: i for i, g in enumerate(model.layer_groups())}


# -- lora -----------------------------------------------------------------------------------


def add_lora(model: VideoBackbone, *, rank: int, alpha: float, dropout: float = 0.0,
             targets: list[str] | None = None, exact: bool = False) -> VideoBackbone:
    """Inject peft LoRA layers into ``targets`` (patterns; full module names when ``exact``) or the family default."""

    chosen = list(targets or []) if exact else lora.resolve_targets(model, targets)
    lora.inject_lora(model, chosen, rank, alpha, dropout)
    structure = {"kind": "lora", "rank": int(rank), "alpha": float(alpha), "dropout": float(dropout), "targets": chosen}
    return make_structured(model, structure, GroupEdits())


def merge_lora(model: VideoBackbone) -> VideoBackbone:
    """Fold the LoRA updates into the base weights (in place): the result is the plain family model."""

    structure = structure_of(model)
    if not structure or structure["kind"] != "lora":
        raise ConfigError(f"{model.backbone_name}: the model carries no LoRA layers to merge")
    lora.fold_lora(model)
    return remove_structure(model)


# -- adapter --------------------------------------------------------------------------------


def _family_hook(model: VideoBackbone, hook: str, missing: str):
    """The family module's ``hook`` (``adapter_sites``, ``probe_tap``; see :mod:`vtransfer.models.peft_sites`).

    A family without it raises :class:`ConfigError`: ``missing`` (what is not
    defined, and what to use instead), then the backbones it does apply to.
    """

    found = getattr(backbone_module(model.backbone_name), hook, None) or getattr(family_module(model.backbone_name), hook, None)
    if found is None:
        applies = [n for n in backbone_names() if getattr(backbone_module(n), hook, None) is not None]
        raise ConfigError(f"{missing.format(backbone=model.backbone_name)}; it applies to {', '.join(applies)}")
    return found


def insert_adapters(model: VideoBackbone, *, ratio: float = 0.5, sites: list[str] | None = None) -> VideoBackbone:
    """Put an ST-Adapter at each of the family's sites (or only those in ``sites``, group names), in place."""
    all_sites = _family_hook(model, "adapter_sites", "policy 'adapter': no adapter sites are defined for backbone "
                                                     "{backbone!r} (use bitfit, lora or a freezing policy)")(model)
    chosen = all_sites if sites is None else [s for s in all_sites if s.group in set(sites)]
    missing = sorted(set(sites or []) - {s.group for s in chosen})
    if missing or not chosen:
        raise ConfigError(f"policy 'adapter': no adapter site {missing or sites}; {model.backbone_name} has "
                          f"{', '.join(s.group for s in all_sites)}")
    ref = _reference(model)
    index = _group_index(model)
    adapters = nn.ModuleDict()
    edits = GroupEdits()
    for site in chosen:
        key = site.group.replace(".", "_")
        width = max(1, int(round(site.channels * ratio)))
        adapters[key] = STAdapter(site.channels, width, site.layout, site.skip_tokens).to(device=ref.device, dtype=ref.dtype)
        name = f"{ADAPTER_PREFIX}.{key}"
        i = index[site.group]
        (edits.before if site.where == "before" else edits.after)[i] = name
        edits.owned.setdefault(i, []).append(name)
        edits.temporal.add(name)
    model.add_module(ADAPTER_PREFIX, adapters)
    structure = {"kind": "adapter", "ratio": float(ratio), "sites": [s.group for s in chosen]}
    return make_structured(model, structure, edits)


# -- attentive probe ------------------------------------------------------------------------


def attach_probe(model: VideoBackbone, *, heads: int = 8, attn_dim: int | None = None) -> VideoBackbone:
    """Make the head group an attentive probe over the unpooled last map, feeding the family's classifier."""
    tap = _family_hook(model, "probe_tap", "policy 'attentive-probe': the unpooled feature map of backbone {backbone!r} "
                                           "is not known (use top-layer for a linear probe)")(model)
    try:
        model.get_submodule(tap.module)
    except AttributeError:
        raise ConfigError(f"policy 'attentive-probe': {model.backbone_name} has no module {tap.module!r} to read") from None
    width = int(attn_dim or tap.width)
    if width % heads:
        valid = [h for h in range(1, min(width, 32) + 1) if width % h == 0]
        raise ConfigError(f"--probe-heads {heads} does not divide the probe width {width}; choose one of "
                          f"{', '.join(map(str, valid))} (or set --probe-dim)")
    ref = _reference(model)
    model.add_module(PROBE_MODULE, AttentiveProbe(tap.width, heads, width).to(device=ref.device, dtype=ref.dtype))
    head = len(model.layer_groups()) - 1
    edits = GroupEdits(before={head: PROBE_MODULE}, unpooled={head - 1: (tap.module, tap.post)}, owned={head: [PROBE_MODULE]})
    structure = {"kind": "attentive-probe", "heads": int(heads), "attn_dim": width}
    return make_structured(model, structure, edits)


# -- what trains ----------------------------------------------------------------------------


def bitfit_params(model: nn.Module) -> list[str]:
    """Names of every bias and every normalisation layer's parameters, in model order."""
    norms = {f"{name}.{p}" if name else p for name, m in model.named_modules() if isinstance(m, NORM_TYPES)
             for p, _ in m.named_parameters(recurse=False)}
    return [n for n, _ in model.named_parameters() if n in norms or n.rpartition(".")[2] == "bias"]


def structure_params(model: VideoBackbone, policy: str) -> list[str]:
    """Names of the parameters ``policy``'s surgery added to ``model``, in model order.

    Raises:
        ConfigError: ``model`` was not prepared for ``policy`` (or was for another one).
    """
    structure = structure_of(model)
    kind = structure["kind"] if structure else None
    if kind != policy:
        found = f"carries a {kind!r} structure" if kind else "is a plain model"
        raise ConfigError(
            f"policy {policy!r} adds modules to the backbone, but this {model.backbone_name} {found}: "
            "call vtransfer.policies.peft.prepare_model_for_policy(model, policy, options) before resolve_policy"
        )
    if policy == "lora":

        return lora_param_names(model)
    prefix = ADAPTER_PREFIX if policy == "adapter" else PROBE_MODULE
    return [n for n, _ in model.named_parameters() if n.startswith(prefix + ".")]


def parameter_counts(model: nn.Module, trainable: list[str] | set[str]) -> dict[str, Any]:
    """``{"trainable", "total", "fraction"}``: scalar parameters named in ``trainable``, all of them, the ratio."""
    names = set(trainable)
    total = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for n, p in model.named_parameters() if n in names)
    return {"trainable": n_train, "total": total, "fraction": n_train / total if total else 0.0}
