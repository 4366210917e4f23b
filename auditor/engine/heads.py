"""Head identity: the one place that maps a cross-attention head's global index to its readable name and back.

A head is named ``<layer>#h<j>``, e.g. ``up_blocks.1.attentions.0.transformer_blocks.0.attn2#h3``, where ``<layer>``
is the module path of an ``attn2`` (cross-attention) module inside the UNet. Layers are ordered the way the UNet
runs them (down blocks, mid block, up blocks; numeric parts compared as numbers) and heads are numbered
contiguously in that order, so global index ``i`` is stable for a given architecture: SD1.5 has H = 128, SD2.x
195, SDXL 1,300.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

# Forward order of a UNet's stages; module names elsewhere sort after these.
_STAGE_RANK = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def _layer_key(name: str) -> tuple:
    parts = name.split(".")
    key: list = [_STAGE_RANK.get(parts[0], 3)]
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


_HEAD_NAME = re.compile(r"^(?P<layer>.+)#h(?P<j>\d+)$")


@dataclass(frozen=True)
class HeadIndex:
    """The heads of one UNet: ``layers[l]`` has ``heads_per_layer[l]`` heads, numbered from ``offsets[l]``."""

    layers: tuple[str, ...]
    heads_per_layer: tuple[int, ...]

    @classmethod
    def from_unet(cls, unet) -> "HeadIndex":
        mods = cross_attention_modules(unet)
        return cls(tuple(n for n, _ in mods), tuple(int(m.heads) for _, m in mods))

    @classmethod
    def from_names(cls, names) -> "HeadIndex":
        """Rebuild from a list of head names (as stored with a relevance matrix); names must be contiguous."""
        layers: list[str] = []
        counts: list[int] = []
        for name in names:
            m = _HEAD_NAME.match(name)
            if not m:
                raise ValueError(f"not a head name: {name!r} (expected '<layer>#h<j>')")
            layer, j = m["layer"], int(m["j"])
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
        return tuple(f"{layer}#h{j}" for layer, n in zip(self.layers, self.heads_per_layer) for j in range(n))

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
        layer, j = _HEAD_NAME.match(self.names[index]).group("layer", "j")
        return layer, int(j)
