"""Head identity: the one place that maps a cross-attention head's global index to its readable name and back.

A head is named ``<layer>#h<j>``, e.g. ``up_blocks.1.attentions.0.transformer_blocks.0.attn2#h3``, where ``<layer>``
is the module path of an attention module that reads the text inside the denoiser: a UNet's or PixArt's ``attn2``
(cross-attention), an SD3 or Flux joint block's ``attn`` (``transformer_blocks.3.attn#h5``), a Flux single-stream
block's ``attn`` (``single_transformer_blocks.7.attn#h2``). Layers are ordered the way the denoiser runs them (down
blocks, mid block, up blocks; double-stream before single-stream blocks; numeric parts compared as numbers) and
heads are numbered contiguously in that order, so global index ``i`` is stable for a given architecture: SD1.5 has
H = 128, SD2.x 195, SDXL 1,300.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from auditor.errors import AuditorError

# Forward order of a UNet's stages; module names elsewhere sort after these.
_STAGE_RANK = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2, "transformer_blocks": 3,
               "single_transformer_blocks": 4}


def _layer_key(name: str) -> tuple:
    parts = name.split(".")
    key: list = [_STAGE_RANK.get(parts[0], 5)]
    for p in parts:
        key.append((0, int(p), "") if p.isdigit() else (1, 0, p))
    return tuple(key)


def is_cross_attention(name: str, module) -> bool:
    """Whether ``module`` is a cross-attention module whose keys come from the text encoder.

    diffusers marks it with ``is_cross_attention``; modules predating that flag are recognised by their name."""
    if not (hasattr(module, "to_q") and hasattr(module, "to_k") and hasattr(module, "heads")):
        return False
    flag = getattr(module, "is_cross_attention", None)
    if flag is not None:
        return bool(flag)
    return name.rsplit(".", 1)[-1] == "attn2"


def cross_attention_modules(unet) -> list[tuple[str, object]]:
    """(name, module) of every cross-attention module of ``unet``, in forward order."""
    found = [(n, m) for n, m in unet.named_modules() if is_cross_attention(n, m)]
    return sorted(found, key=lambda nm: _layer_key(nm[0]))


def denoiser_of(pipe):
    """The network a pipeline denoises with: ``pipe.unet`` (SD1.x/2.x, SDXL) or ``pipe.transformer`` (PixArt, SD3,
    Flux); an AuditorError for a pipeline with neither."""
    for attr in ("unet", "transformer"):
        net = getattr(pipe, attr, None)
        if net is not None:
            return net
    raise AuditorError(f"{type(pipe).__name__} has neither a UNet nor a transformer to trace")


def joint_kind(name: str, module) -> str | None:
    """How an attention module without a separate text input reads the text, or None when it does not.

    "joint": SD3/Flux double-stream attention, one softmax over image and text keys, the text stream projected by
    ``add_k_proj``; "single": a Flux single-stream block, one sequence whose first tokens are the text. SD3.5's
    ``attn2`` (image self-attention) has no ``add_k_proj`` and is neither."""
    if not (hasattr(module, "to_q") and hasattr(module, "heads")):
        return None
    if getattr(module, "add_k_proj", None) is not None:
        return "joint"
    if name.startswith("single_transformer_blocks.") and name.endswith(".attn"):
        return "single"
    return None


def text_attention_modules(denoiser) -> list[tuple[str, object]]:
    """(name, module) of every attention module of ``denoiser`` whose keys include the text, in forward order:
    cross-attention when it has any (UNets, PixArt), else joint and single-stream attention (SD3, Flux)."""
    cross, joint = [], []
    for n, m in denoiser.named_modules():  # one walk (a trace is set up per generation)
        if is_cross_attention(n, m):
            cross.append((n, m))
        elif joint_kind(n, m) is not None:
            joint.append((n, m))
    return sorted(cross or joint, key=lambda nm: _layer_key(nm[0]))


_HEAD_NAME = re.compile(r"^(?P<layer>.+)#h(?P<j>\d+)$")


def head_name(layer: str, j: int) -> str:
    """The name of head ``j`` of ``layer``."""
    return f"{layer}#h{j}"


def parse_head_name(name: str) -> tuple[str, int]:
    """(layer, head number within the layer) of a head name; a ValueError for anything else."""
    m = _HEAD_NAME.match(name)
    if not m:
        raise ValueError(f"not a head name: {name!r} (expected '<layer>#h<j>')")
    return m["layer"], int(m["j"])


def layer_of(name: str) -> str:
    """The layer of a head name; a string that is not a head name is its own layer (for display, never refused)."""
    m = _HEAD_NAME.match(name)
    return m["layer"] if m else name


@dataclass(frozen=True)
class HeadIndex:
    """The heads of one denoiser: ``layers[l]`` has ``heads_per_layer[l]`` heads, numbered from ``offsets[l]``."""

    layers: tuple[str, ...]
    heads_per_layer: tuple[int, ...]

    @classmethod
    def from_unet(cls, unet) -> "HeadIndex":
        """The heads of a denoiser (a UNet or a transformer: ``denoiser_of(pipe)``) that read the text."""
        mods = text_attention_modules(unet)
        return cls(tuple(n for n, _ in mods), tuple(int(m.heads) for _, m in mods))

    @classmethod
    def from_names(cls, names) -> "HeadIndex":
        """Rebuild from a list of head names (as stored with a relevance matrix); names must be contiguous."""
        layers: list[str] = []
        counts: list[int] = []
        for name in names:
            layer, j = parse_head_name(name)
            if layers and layers[-1] == layer:
                if j != counts[-1]:
                    raise ValueError(f"head names out of order at {name!r}")
                counts[-1] += 1
            else:
                if j != 0 or layer in layers:
                    raise ValueError(f"head names out of order at {name!r}")
                layers.append(layer)
                counts.append(1)
        return cls(tuple(layers), tuple(counts))

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        out, total = [], 0
        for n in self.heads_per_layer:
            out.append(total)
            total += n
        return tuple(out)

    @property
    def total(self) -> int:
        return sum(self.heads_per_layer)

    def __len__(self) -> int:
        return self.total

    @cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(head_name(layer, j) for layer, n in zip(self.layers, self.heads_per_layer) for j in range(n))

    @cached_property
    def _by_name(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}

    def name(self, index: int) -> str:
        return self.names[index]

    def index(self, name: str) -> int:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no head named {name!r}") from None

    def layer_slice(self, layer: str | int) -> slice:
        """Global indices of one layer's heads."""
        li = self.layers.index(layer) if isinstance(layer, str) else layer
        return slice(self.offsets[li], self.offsets[li] + self.heads_per_layer[li])

    def locate(self, index: int) -> tuple[str, int]:
        """(layer name, head number within the layer) of a global index."""
        return parse_head_name(self.names[index])
