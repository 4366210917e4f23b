"""The recorder: per-head cross-attention captured while a diffusers pipeline runs, without changing its output.

It knows nothing of maps (``auditor.engine.trace`` is what a user reads). Tapping a pipeline swaps the processor
of every attention module that reads the text (a UNet's or PixArt's ``attn2``, ``auditor.engine.capture_cross``;
SD3's and Flux's joint and single-stream attention, ``auditor.engine.capture_dit``) for one that computes the attention
probabilities explicitly, returns exactly what the stock processor returns
(``probs @ V``, same norms, mask, residual and rescale handling), and adds the probabilities of the conditional
half of the classifier-free-guidance batch into one running sum per layer, ``[items, heads, h*w, tokens]`` on the
model's device (an item is one (prompt, image) pair of the call). Memory does not depend on the number of steps
(small joint-attention calls whose scoring waits to be batched hold at most ``capture_dit.DEFER_TOTAL_BYTES``).
Self-attention keeps whatever processor it had. The original processors come back when the block exits, also
when generation raises.

Three light hooks feed the processors what they cannot see themselves:
- ``pipe.encode_prompt`` (wrapped on the instance): the prompts and ``num_images_per_prompt`` of the call, and the
  start of a new generation (buffers are reset, so a trace holds the latest call);
- a forward pre-hook on the denoiser (``pipe.unet`` or ``pipe.transformer``): one denoising evaluation, the latent
  size (for a transformer its patch grid), and whether guidance doubled the batch (read from the pipeline's own
  ``do_classifier_free_guidance``, else from the flag its ``encode_prompt`` was given);
- the step count against ``pipe._num_timesteps`` decides whether a step falls inside the timestep ``window``.
A tap made with ``free_passes=True`` is fed denoiser calls made outside any pipeline call (reading a given image):
every evaluation counts and none is a guidance pair.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math

import torch

from auditor.engine.capture_cross import PLAIN_PROCESSORS, Observer, _TapProcessor
from auditor.engine.heads import HeadIndex, denoiser_of, text_attention_modules
from auditor.errors import AuditorError


def take(x: torch.Tensor, runs: tuple[slice, ...], dim: int) -> torch.Tensor:
    """``x``'s entries along ``dim`` in ``runs`` (slices, in order): a view for one run, else one copy."""
    if len(runs) == 1:
        return x.narrow(dim, runs[0].start, runs[0].stop - runs[0].start)
    return torch.cat([x.narrow(dim, r.start, r.stop - r.start) for r in runs], dim)


def layer_grid(latent_hw: tuple[int, int], n_pixels: int) -> tuple[int, int]:
    """(h, w) of a layer with ``n_pixels`` queries: the latent halved (rounding up, as stride-2 convs do) until it fits."""
    h, w = latent_hw
    while h * w > n_pixels:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w != n_pixels:
        raise AuditorError(f"a cross-attention layer has {n_pixels} queries, which is no downsampling of the "
                           f"{latent_hw[0]}x{latent_hw[1]} latent")
    return h, w


class Tap:
    """What the hooks share: the current generation (prompts, images per prompt), step counting, guidance halves.

    Subclasses decide what to do with each layer's conditional-half queries and probabilities (``on_attention``).
    """

    needs_probs = True  # False: the subclass reads only queries, and attention keeps SDPA for every item
    # True: the subclass only adds up each layer's probabilities over calls, so the recorder may score small calls
    # later and together (``capture_dit.PendingCalls``) and show it one sum per layer (query None); ``flush`` does
    sums_only = False

    def __init__(self, pipe, window: tuple[float, float] = (0.0, 1.0), free_passes: bool = False):
        a, b = window
        if not 0.0 <= a < b <= 1.0:
            raise AuditorError(f"window must satisfy 0 <= start < end <= 1, got {window}")
        self.denoiser = denoiser_of(pipe)
        # a transformer reads a patch grid, and its pipelines differ from the UNet ones in what the hooks see
        self.transformer = self.denoiser is not getattr(pipe, "unet", None)
        self.pipe = pipe
        self.window = (float(a), float(b))
        # denoiser calls made by the caller, not a pipeline: the pipeline's step total and guidance flag, left from
        # its last call, say nothing about them
        self.free_passes = bool(free_passes)
        mods = text_attention_modules(self.denoiser)
        if not mods:
            raise AuditorError(f"{type(self.denoiser).__name__} has no attention that reads the text to trace")
        self.modules = mods
        self.head_index = HeadIndex(tuple(n for n, _ in mods), tuple(int(m.heads) for _, m in mods))
        self.prompts: list[str] | None = None
        self.prompts_2: list[str] | None = None  # SDXL's prompt_2 (its second text encoder's), when the call gave one
        self.images_per_prompt = 1
        self.grids: dict[str, tuple[int, int]] = {}
        self.latent_size: tuple[int, int] | None = None
        self.text_len: int | None = None  # text tokens the denoiser reads (a single-stream sequence starts with them)
        self.encode_cfg = False  # the guidance flag encode_prompt was given (pipelines without the property)
        self._last_timestep: float | None = None
        self.steps_seen = 0  # denoiser evaluations in this generation
        self.steps_counted = 0  # those inside the window
        self.steps_total: int | None = None
        self._counting = False
        self.first_cond = 0  # batch index of the first conditional item
        self._column_runs = None  # (kept columns, total, runs): columns_for's last answer
        self._observers: dict[int, Observer] = {}
        self.pending = None  # calls waiting to be scored (a ``capture_dit.PendingCalls``), for ``sums_only`` taps

    # --- hook callbacks ---------------------------------------------------------------------------------------
    def on_generation(self, prompts: list[str] | None, images_per_prompt: int,
                      prompts_2: list[str] | None = None, cfg: bool | None = None) -> None:
        if self.transformer and self.prompts is not None and self.steps_seen == 0 and not self.free_passes:
            # Flux's true guidance encodes the negative prompt right after the prompt, before any step: same call
            return
        self.encode_cfg = bool(cfg)
        self._last_timestep = None
        self.prompts, self.images_per_prompt = prompts, max(int(images_per_prompt or 1), 1)
        self.prompts_2 = prompts_2
        self.steps_seen = self.steps_counted = 0
        self.grids = {}
        if self.pending is not None:  # the previous generation's waiting calls go with its sums
            self.pending.clear()
        self.reset()

    def on_step(self, sample: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                grid: tuple[int, int] | None = None, timestep: float | None = None) -> None:
        """One denoiser evaluation: ``sample`` its input, ``grid`` the transformer's patch grid (None: the UNet's
        latent, ``sample``'s last two sides), ``timestep`` its timestep when known."""
        if (self.transformer and not self.free_passes and timestep is not None
                and timestep == self._last_timestep):
            # a second evaluation at one timestep is a guidance pass of its own (Flux's negative prompt, SD3's
            # skip-layer guidance): not the prompt's attention, and not a step
            self._counting = False
            return
        self._last_timestep = timestep
        self.latent_size = tuple(grid) if grid is not None else (int(sample.shape[-2]), int(sample.shape[-1]))
        total = None if self.free_passes else getattr(self.pipe, "_num_timesteps", None)
        if total is None and self.transformer and not self.free_passes:
            # PixArt keeps no step count: the scheduler was set for this call before its first step
            ts = getattr(self.pipe.scheduler, "timesteps", None)
            total = len(ts) if ts is not None and len(ts) else None
        self.steps_total = int(total) if total else None
        i = self.steps_seen
        self.steps_seen += 1
        # Outside a pipeline call there is no step total: every evaluation counts.
        self._counting = self.steps_total is None or (
            self.window[0] * self.steps_total <= i < self.window[1] * self.steps_total)
        if self._counting:
            self.steps_counted += 1
        batch = int(sample.shape[0])
        # The SD pipelines put [unconditional | conditional] in one batch when guidance is on.
        try:
            cfg = not self.free_passes and bool(self.pipe.do_classifier_free_guidance)
        except (AttributeError, TypeError):
            cfg = not self.free_passes and self.encode_cfg
        self.first_cond = batch // 2 if cfg and batch % 2 == 0 else 0

    def observer(self, layer_index: int, attn) -> Observer | None:
        if not self._counting:
            return None
        if layer_index not in self._observers:  # asked at every layer call: made once per layer
            self._observers[layer_index] = functools.partial(self.show, layer_index, attn)
        return self._observers[layer_index]

    def show(self, layer_index: int, attn, query: torch.Tensor | None, probs: torch.Tensor | None, rows: slice,
             n: int, total: int | None = None) -> None:
        """Hand one block of a layer's recorded items to ``on_attention``, keeping only the tap's columns of
        ``probs`` unless ``total`` says the recorder kept them already."""
        name = self.head_index.layers[layer_index]
        if name not in self.grids:
            self.grids[name] = layer_grid(self.latent_size, n)
        if probs is not None and total is None:
            runs = self.columns_for(int(probs.shape[-1]))
            if runs is not None:
                probs = take(probs, runs, -1)
        self.on_attention(layer_index, attn, query, probs, rows, n)

    def flush(self) -> None:
        """Score the calls still waiting (``sums_only`` taps): whoever reads what ``on_attention`` summed calls
        this first."""
        if self.pending is not None and self.pending.calls:
            self.pending.flush(self)

    def columns_for(self, total: int) -> tuple[slice, ...] | None:
        """The text columns this tap keeps of a ``total``-token sequence, as runs of consecutive columns (None: all;
        ``take`` applies them). A recorder that can compute just these asks before computing any."""
        cols = self.kept_columns(total)
        if cols is None:
            return None
        last = self._column_runs
        if last is None or last[0] is not cols or last[1] != total:  # asked at every layer call: cached
            if cols[-1] >= total:
                raise AuditorError(f"token index {cols[-1]} is past the text sequence ({total} tokens)")
            starts = [i for i, c in enumerate(cols) if i == 0 or c != cols[i - 1] + 1]
            runs = tuple(slice(cols[a], cols[b - 1] + 1) for a, b in zip(starts, starts[1:] + [len(cols)]))
            self._column_runs = last = (cols, total, runs)
        return last[2]

    # --- for subclasses ---------------------------------------------------------------------------------------
    def reset(self) -> None:
        """A new generation starts."""

    def kept_columns(self, total: int) -> tuple[int, ...] | None:
        """Sorted text columns to keep of a sequence of ``total`` tokens; None keeps every column."""
        return None

    def on_attention(self, layer_index: int, attn, query: torch.Tensor, probs: torch.Tensor | None, rows: slice,
                     n: int) -> None:
        """One block of a layer call, conditional items only: ``query`` [items, heads, r, d] and ``probs``
        [items, heads, r, T] (None unless ``needs_probs``; T the ``kept_columns``) for the layer's query ``rows``
        out of ``n``. For a ``sums_only`` tap ``probs`` may be several calls' sum, and ``query`` is then None."""

    @property
    def image_size(self) -> tuple[int, int] | None:
        if self.latent_size is None:
            return None
        f = int(getattr(self.pipe, "vae_scale_factor", 8) or 8)
        if self.transformer:
            from auditor.engine.capture_dit import latent_per_cell  # capture_dit imports this module

            f *= latent_per_cell(self.denoiser)
        return self.latent_size[0] * f, self.latent_size[1] * f


def _as_prompt_list(prompt) -> list[str] | None:
    if prompt is None:
        return None
    return [prompt] if isinstance(prompt, str) else [str(p) for p in prompt]


def _tap_processors(tap: Tap, capture_dit) -> list[tuple[object, object, object]]:
    """(module, its processor, the tap's processor for it) for every module the tap records; an AuditorError for a
    processor whose computation the capture does not reproduce, or one that is already a tap's."""
    out = []
    for i, (name, mod) in enumerate(tap.modules):
        proc = mod.processor
        kind = type(proc).__name__
        if getattr(proc, "is_tap", False):
            raise AuditorError("this pipeline is already being traced (traces do not nest)")
        make = capture_dit.processor_for(name, mod, proc) if tap.transformer else None
        if make is None:
            if kind not in PLAIN_PROCESSORS:
                raise AuditorError(f"cannot trace {name}: its attention processor {kind} is not plain attention "
                                   f"(supported: {', '.join(sorted(PLAIN_PROCESSORS))})")
            make = _TapProcessor
        out.append((mod, proc, make(tap, i)))
    return out


@contextlib.contextmanager
def tapped(tap: Tap):
    """Install ``tap`` on ``tap.pipe`` for the duration of the block; everything is put back on exit."""
    from auditor.engine import capture_dit  # it imports this module (layer_grid, take)

    pipe = tap.pipe
    swaps = _tap_processors(tap, capture_dit)
    memo: dict = {}

    def pre_hook(module, args, kwargs):
        if tap.transformer:
            sample, grid, tap.text_len, t = capture_dit.step_inputs(module, args, kwargs, memo)
            tap.on_step(sample, None, grid, t)
            return
        sample = args[0] if args else kwargs.get("sample")
        ehs = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        tap.on_step(sample, ehs)

    encode = getattr(pipe, "encode_prompt", None)
    had_own_encode = "encode_prompt" in vars(pipe)
    handle = None
    try:
        for mod, _, proc in swaps:
            mod.set_processor(proc)
        handle = tap.denoiser.register_forward_pre_hook(pre_hook, with_kwargs=True)
        if encode is not None:
            sig = inspect.signature(encode)

            @functools.wraps(encode)
            def encode_and_note(*args, **kwargs):
                try:
                    bound = sig.bind_partial(*args, **kwargs).arguments
                except TypeError:
                    bound = kwargs
                tap.on_generation(_as_prompt_list(bound.get("prompt")), bound.get("num_images_per_prompt", 1),
                                  _as_prompt_list(bound.get("prompt_2")), bound.get("do_classifier_free_guidance"))
                return encode(*args, **kwargs)

            pipe.encode_prompt = encode_and_note
        yield tap
    finally:
        for mod, proc, _ in swaps:
            mod.set_processor(proc)
        if handle is not None:
            handle.remove()
        if encode is not None:
            if had_own_encode:
                pipe.encode_prompt = encode
            else:
                vars(pipe).pop("encode_prompt", None)
        tap.flush()  # the calls still waiting hold the model's tensors: scored now, not when first read
