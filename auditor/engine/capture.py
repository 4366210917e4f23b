"""Capture per-head cross-attention while a diffusers pipeline generates, without changing what it generates.

``with trace(pipe) as tr: pipe(prompt, ...)`` swaps the processor of every cross-attention module (``attn2``) for
one that computes the attention probabilities explicitly, returns exactly what the stock processor returns
(``probs @ V``, same norms, mask, residual and rescale handling), and adds the probabilities of the conditional
half of the classifier-free-guidance batch into one running sum per layer, ``[items, heads, h*w, tokens]`` on the
model's device (an item is one (prompt, image) pair of the call). Memory does not depend on the number of steps.
Self-attention keeps whatever processor it had. The original processors come back when the block exits, also
when generation raises.

Three light hooks feed the processors what they cannot see themselves:
- ``pipe.encode_prompt`` (wrapped on the instance): the prompts and ``num_images_per_prompt`` of the call, and the
  start of a new generation (buffers are reset, so a trace holds the latest call);
- a forward pre-hook on the UNet: one denoising evaluation, the latent size, and whether guidance doubled the batch
  (read from the pipeline's own ``do_classifier_free_guidance``);
- the step count against ``pipe._num_timesteps`` decides whether a step falls inside the timestep ``window``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from auditor.engine.heads import HeadIndex, cross_attention_modules
from auditor.errors import AuditorError

# Processors whose output is plain scaled-dot-product attention, so the explicit computation below reproduces it.
# Others (IP-Adapter, custom) take extra inputs the capture would silently drop, so tracing refuses them.
PLAIN_PROCESSORS = frozenset({
    "AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor", "SlicedAttnProcessor", "AttnProcessorNPU",
    "FusedAttnProcessor2_0", "XLAFlashAttnProcessor2_0", "AttnProcessorXFormers",
})

# observe(query rows [items, heads, r, d], probs rows [items, heads, r, T] or None, rows: slice of the layer's N
# queries, N), for the recorded (conditional) items only
Observer = Callable[[torch.Tensor, "torch.Tensor | None", slice, int], None]

CPU_BLOCK_BYTES = 2 << 20  # on CPU, scores are computed in query blocks of about this size (see block_rows)


def block_rows(device: torch.device, batch: int, heads: int, n: int, tokens: int) -> int:
    """Queries per block. On CPU, a whole layer's [batch, heads, N, T] scores (10 MB at SD's 64x64 layers) fall out
    of cache between matmul, softmax and probs @ V; blocks that fit run about twice as fast. GPUs want one block."""
    if device.type != "cpu":
        return n
    return max(64, CPU_BLOCK_BYTES // (4 * batch * heads * tokens))


# Below this many score entries in the unrecorded items, computing them explicitly too is cheaper than a separate
# SDPA call for them (a tiny layer's cost is the number of operations, not arithmetic).
SPLIT_MIN_SCORES = 1 << 18


def _explicit(q, k, v, mask, scale: float, observe: Observer | None, first_recorded: int = 0) -> torch.Tensor:
    """softmax(Q K^T * scale + mask) @ V in query blocks; items from ``first_recorded`` on shown to ``observe``."""
    # Scores and softmax in float32 whatever the model dtype: the sums we keep must not lose the small
    # probabilities, and SDPA's fused kernels accumulate in float32 as well. (The scale goes on the T x d keys
    # rather than the N x T scores: same result, far fewer multiplications.)
    kt = k.float().transpose(-1, -2) * scale
    batch, heads, n = q.shape[:3]
    step = block_rows(q.device, batch, heads, n, kt.shape[-1])
    outs = []
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        qb = q if step >= n else q[:, :, rows]
        scores = torch.matmul(qb.float(), kt)
        if mask is not None:
            scores = scores + (mask if mask.shape[2] == 1 else mask[:, :, rows]).float()
        probs = scores.softmax(dim=-1)
        if observe is not None:
            lo = first_recorded
            observe(qb[lo:] if lo else qb, probs[lo:] if lo else probs, rows, n)
        outs.append(torch.matmul(probs.to(v.dtype), v))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def attend(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
           observe: Observer | None = None, first_recorded: int = 0, need_probs: bool = True) -> torch.Tensor:
    """The stock attention computation; batch items from ``first_recorded`` on are shown to ``observe``.

    Recorded items get explicit probabilities (computed once, reused for probs @ V) when ``need_probs``; every
    other item, and every item of an unobserved call, goes through SDPA exactly as the stock processor does."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
    batch, seq_len = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape[:2]
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
        attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)

    head_dim = key.shape[-1] // attn.heads
    q = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    k = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    v = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)

    def sdpa(sl: slice) -> torch.Tensor:
        m = None if attention_mask is None else attention_mask[sl]
        # attn.scale is SDPA's default 1/sqrt(d) unless the module was built with scale_qk=False, whose stock
        # (non-SDPA) processor uses attn.scale too
        return F.scaled_dot_product_attention(q[sl], k[sl], v[sl], attn_mask=m, dropout_p=0.0, is_causal=False,
                                              scale=attn.scale)

    lo = min(max(int(first_recorded), 0), batch)
    if observe is None or not need_probs:
        out = sdpa(slice(None))
        if observe is not None and lo < batch:
            observe(q[lo:], None, slice(0, q.shape[2]), q.shape[2])
    elif lo == 0 or lo * attn.heads * q.shape[2] * k.shape[2] < SPLIT_MIN_SCORES:
        out = _explicit(q, k, v, attention_mask, attn.scale, observe, lo)
    else:  # unrecorded items (the unconditional half) through SDPA, recorded ones explicitly
        mask = None if attention_mask is None else attention_mask[lo:]
        rec = _explicit(q[lo:], k[lo:], v[lo:], mask, attn.scale, observe)
        out = torch.cat([sdpa(slice(0, lo)), rec.to(q.dtype)], dim=0)
    out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
    out = attn.to_out[0](out)
    out = attn.to_out[1](out)
    if input_ndim == 4:
        out = out.transpose(-1, -2).reshape(batch, channel, height, width)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


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

    def __init__(self, pipe, window: tuple[float, float] = (0.0, 1.0)):
        a, b = window
        if not 0.0 <= a < b <= 1.0:
            raise AuditorError(f"window must satisfy 0 <= start < end <= 1, got {window}")
        if getattr(pipe, "unet", None) is None:
            raise AuditorError(f"{type(pipe).__name__} has no UNet: trace works on UNet diffusion pipelines")
        self.pipe = pipe
        self.window = (float(a), float(b))
        mods = cross_attention_modules(pipe.unet)
        if not mods:
            raise AuditorError(f"{type(pipe.unet).__name__} has no cross-attention modules to trace")
        self.modules = mods
        self.head_index = HeadIndex(tuple(n for n, _ in mods), tuple(int(m.heads) for _, m in mods))
        self.prompts: list[str] | None = None
        self.prompts_2: list[str] | None = None  # SDXL's prompt_2 (its second text encoder's), when the call gave one
        self.images_per_prompt = 1
        self.grids: dict[str, tuple[int, int]] = {}
        self.latent_size: tuple[int, int] | None = None
        self.steps_seen = 0  # UNet evaluations in this generation
        self.steps_counted = 0  # those inside the window
        self.steps_total: int | None = None
        self._counting = False
        self.first_cond = 0  # batch index of the first conditional item

    # --- hook callbacks ---------------------------------------------------------------------------------------
    def on_generation(self, prompts: list[str] | None, images_per_prompt: int,
                      prompts_2: list[str] | None = None) -> None:
        self.prompts, self.images_per_prompt = prompts, max(int(images_per_prompt or 1), 1)
        self.prompts_2 = prompts_2
        self.steps_seen = self.steps_counted = 0
        self.grids = {}
        self.reset()

    def on_step(self, sample: torch.Tensor, encoder_hidden_states: torch.Tensor | None) -> None:
        self.latent_size = (int(sample.shape[-2]), int(sample.shape[-1]))
        total = getattr(self.pipe, "_num_timesteps", None)
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
            cfg = bool(self.pipe.do_classifier_free_guidance)
        except (AttributeError, TypeError):
            cfg = False
        self.first_cond = batch // 2 if cfg and batch % 2 == 0 else 0

    def observer(self, layer_index: int, attn) -> Observer | None:
        if not self._counting:
            return None

        def observe(query: torch.Tensor, probs: torch.Tensor | None, rows: slice, n: int) -> None:
            name = self.head_index.layers[layer_index]
            if name not in self.grids:
                self.grids[name] = layer_grid(self.latent_size, n)
            self.on_attention(layer_index, attn, query, probs, rows, n)

        return observe

    # --- for subclasses ---------------------------------------------------------------------------------------
    def reset(self) -> None:
        """A new generation starts."""

    def on_attention(self, layer_index: int, attn, query: torch.Tensor, probs: torch.Tensor | None, rows: slice,
                     n: int) -> None:
        """One block of a layer call, conditional items only: ``query`` [items, heads, r, d] and ``probs``
        [items, heads, r, T] (None unless ``needs_probs``) for the layer's query ``rows`` out of ``n``."""

    @property
    def image_size(self) -> tuple[int, int] | None:
        if self.latent_size is None:
            return None
        f = int(getattr(self.pipe, "vae_scale_factor", 8) or 8)
        return self.latent_size[0] * f, self.latent_size[1] * f


class _TapProcessor:
    """The attn2 processor installed while tapping: stock output, probabilities shown to the tap."""

    def __init__(self, tap: Tap, layer_index: int):
        self.tap, self.layer_index = tap, layer_index

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        tap = self.tap
        return attend(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                      observe=tap.observer(self.layer_index, attn), first_recorded=tap.first_cond,
                      need_probs=tap.needs_probs)


def _as_prompt_list(prompt) -> list[str] | None:
    if prompt is None:
        return None
    return [prompt] if isinstance(prompt, str) else [str(p) for p in prompt]


@contextlib.contextmanager
def tapped(tap: Tap):
    """Install ``tap`` on ``tap.pipe`` for the duration of the block; everything is put back on exit."""
    pipe = tap.pipe
    originals = []
    for name, mod in tap.modules:
        proc = mod.processor
        kind = type(proc).__name__
        if isinstance(proc, _TapProcessor):
            raise AuditorError("this pipeline is already being traced (traces do not nest)")
        if kind not in PLAIN_PROCESSORS:
            raise AuditorError(f"cannot trace {name}: its attention processor {kind} is not plain attention "
                               f"(supported: {', '.join(sorted(PLAIN_PROCESSORS))})")
        originals.append((mod, proc))

    def pre_hook(module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        ehs = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        tap.on_step(sample, ehs)

    encode = getattr(pipe, "encode_prompt", None)
    had_own_encode = "encode_prompt" in vars(pipe)
    handle = None
    try:
        for i, (mod, _) in enumerate(originals):
            mod.set_processor(_TapProcessor(tap, i))
        handle = pipe.unet.register_forward_pre_hook(pre_hook, with_kwargs=True)
        if encode is not None:
            sig = inspect.signature(encode)

            @functools.wraps(encode)
            def encode_and_note(*args, **kwargs):
                try:
                    bound = sig.bind_partial(*args, **kwargs).arguments
                except TypeError:
                    bound = kwargs
                tap.on_generation(_as_prompt_list(bound.get("prompt")), bound.get("num_images_per_prompt", 1),
                                  _as_prompt_list(bound.get("prompt_2")))
                return encode(*args, **kwargs)

            pipe.encode_prompt = encode_and_note
        yield tap
    finally:
        for mod, proc in originals:
            mod.set_processor(proc)
        if handle is not None:
            handle.remove()
        if encode is not None:
            if had_own_encode:
                pipe.encode_prompt = encode
            else:
                vars(pipe).pop("encode_prompt", None)


class Trace(Tap):
    """Per-layer sums of cross-attention probabilities of the latest generation, and the maps built from them.

    ``buffers[layer]`` is ``[items, heads, h*w, T]`` (float32, model device): item ``p * images_per_prompt + i`` is
    image ``i`` of prompt ``p``; T is every token column of the text sequence, or only ``tokens`` when given.
    Sums run over the counted steps (``steps_counted``); maps divide by it.
    """

    def __init__(self, pipe, window=(0.0, 1.0), tokens: Iterable[int] | None = None, relevance=None):
        super().__init__(pipe, window)
        self.columns: tuple[int, ...] | None = None if tokens is None else tuple(sorted({int(t) for t in tokens}))
        if self.columns is not None and (not self.columns or self.columns[0] < 0):
            raise AuditorError(f"tokens must be non-negative token indices, got {tokens!r}")
        self.relevance = relevance
        self.buffers: dict[str, torch.Tensor] = {}
        self.seq_len: int | None = None

    def reset(self) -> None:
        self.buffers = {}

    def on_attention(self, layer_index, attn, query, probs, rows, n) -> None:
        name = self.head_index.layers[layer_index]
        self.seq_len = int(probs.shape[-1])
        if self.columns is not None:
            if self.columns[-1] >= self.seq_len:
                raise AuditorError(f"token index {self.columns[-1]} is past the text sequence ({self.seq_len} tokens)")
            probs = probs[..., list(self.columns)]
        shape = (probs.shape[0], probs.shape[1], n, probs.shape[3])
        buf = self.buffers.get(name)
        if buf is None or buf.shape != shape:
            # (a shape change means a new resolution or batch without a new encode_prompt: start this layer over)
            buf = self.buffers[name] = torch.zeros(shape, dtype=torch.float32, device=probs.device)
        (buf if probs.shape[2] == n else buf[:, :, rows]).add_(probs)

    # --- reading ----------------------------------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        return list(self.head_index.layers)

    @property
    def head_names(self) -> tuple[str, ...]:
        return self.head_index.names

    @property
    def n_items(self) -> int:
        return next(iter(self.buffers.values())).shape[0] if self.buffers else 0

    @property
    def tokenizer(self):
        return getattr(self.pipe, "tokenizer", None)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def item(self, prompt_index: int = 0, image_index: int = 0) -> int:
        n_prompts = len(self.prompts) if self.prompts else self.n_items // self.images_per_prompt
        if not 0 <= prompt_index < max(n_prompts, 1) or not 0 <= image_index < self.images_per_prompt:
            raise AuditorError(f"no generation for prompt {prompt_index}, image {image_index} "
                               f"({n_prompts} prompt(s) x {self.images_per_prompt} image(s) traced)")
        return prompt_index * self.images_per_prompt + image_index

    def column(self, token: int) -> int:
        """Buffer column of a token index of the text sequence."""
        if self.columns is None:
            if self.seq_len is not None and not 0 <= token < self.seq_len:
                raise AuditorError(f"token index {token} is outside the text sequence ({self.seq_len} tokens)")
            return int(token)
        try:
            return self.columns.index(int(token))
        except ValueError:
            raise AuditorError(f"token {token} was not recorded (trace(tokens=...) kept {list(self.columns)})") from None

    def token_indices(self, word: str, prompt_index: int = 0, occurrence: int = 0) -> tuple[int, ...]:
        """Token indices of ``word`` in the traced prompt (via ``auditor.align``)."""
        from auditor.align import word_indices

        if not self.prompts:
            raise AuditorError("the traced call gave no prompt text (prompt_embeds?): use token indices instead")
        if self.tokenizer is None:
            raise AuditorError("the pipeline has no tokenizer to locate words: use token indices instead")
        prompt = self.prompts[prompt_index]
        second = self._prompt_2(prompt_index)
        if second is None:
            try:
                span = word_indices(prompt, word, self.tokenizer, occurrence)
            except KeyError as exc:
                raise AuditorError(str(exc.args[0])) from None
            if not span.indices:
                raise AuditorError(f"{word!r} falls past the text encoder's token limit in {prompt!r}")
            return span.indices
        return self._indices_of_two(word, prompt, second, occurrence)

    def _prompt_2(self, prompt_index: int) -> str | None:
        """The prompt the second text encoder read for this item, when it differs from ``prompt``."""
        if not self.prompts_2:
            return None
        second = self.prompts_2[prompt_index if len(self.prompts_2) > 1 else 0]
        return None if second == self.prompts[prompt_index] else second

    def _indices_of_two(self, word: str, prompt: str, second: str, occurrence: int) -> tuple[int, ...]:
        """SDXL puts the two encoders' states side by side: text token i is token i of ``prompt`` (first encoder)
        joined with token i of ``prompt_2`` (second). A word's columns are where either prompt has it, each prompt
        read by its own tokenizer; a column where the other prompt has a different word would mix the two, so it
        is refused rather than mapped."""
        from auditor.align import word_indices

        tokenizers = (self.tokenizer, getattr(self.pipe, "tokenizer_2", None) or self.tokenizer)
        texts = (prompt, second)
        found = []
        for text, tok in zip(texts, tokenizers):
            try:
                span = word_indices(text, word, tok, occurrence)
            except KeyError:
                continue
            if not span.indices:
                raise AuditorError(f"{word!r} falls past the text encoder's token limit in {text!r}")
            found += span.indices
        if not found:
            raise AuditorError(f"word {word!r} does not occur {occurrence + 1} time(s) in the prompt {prompt!r} "
                               f"or its prompt_2 {second!r}")
        tokens = []
        for text, tok in zip(texts, tokenizers):
            ids = tok(text, truncation=True)["input_ids"]
            special = set(getattr(tok, "all_special_ids", ()))
            tokens.append([None if i in special else i for i in ids])
        for i in sorted(set(found)):
            a, b = (t[i] if i < len(t) else None for t in tokens)
            if a is not None and b is not None and a != b:
                words = [tok.decode([x]).strip() for tok, x in zip(tokenizers, (a, b))]
                raise AuditorError(f"{word!r}: text token {i} joins {words[0]!r} of the prompt with {words[1]!r} of "
                                   f"prompt_2 (one per text encoder), so its map would mix two words; pass token "
                                   f"indices to map it anyway, or generate with prompt_2 unset or equal to the prompt")
        return tuple(sorted(set(found)))

    def special_tokens(self, prompt_index: int = 0) -> dict[str, list[int]]:
        """Token indices of the start token, end token and padding of a traced prompt (their maps on request)."""
        ids = self.tokenizer(self.prompts[prompt_index], truncation=True)["input_ids"]
        n = self.seq_len or getattr(self.tokenizer, "model_max_length", 77)
        return {"start": [0], "end": [len(ids) - 1], "padding": list(range(len(ids), n))}

    def maps(self, word: str | Sequence[int], method: str = "selective", k: int | None = None,
             prompt_index: int = 0, image_index: int = 0, category: str | None = None, relevance=None,
             occurrence: int = 0, size="image") -> np.ndarray:
        """The word's map by ``method`` (selective | all_heads | bottom_k | weighted), normalised to [0, 1].

        ``word`` may be a word of the prompt or token indices. Selective methods need a relevance matrix (given here,
        to ``trace``, or found for the model by fingerprint) and the word's category (lexicon, else inferred)."""
        return self.concept(word, method, k, prompt_index, image_index, category, relevance, occurrence, size).norm

    def concept(self, word, method="selective", k=None, prompt_index=0, image_index=0, category=None,
                relevance=None, occurrence=0, size="image"):
        """Like ``maps`` but the full ``ConceptMap`` record (raw map, heads used, category, mask)."""
        from auditor.engine import maps as _maps

        idx = self._indices(word, prompt_index, occurrence)
        if method != "all_heads":
            relevance = relevance or self._relevance()
            if category is None:
                if isinstance(word, str):
                    from auditor.engine.relevance import category_of

                    category = category_of(word, self.pipe, relevance.category_limit).category
                else:
                    raise AuditorError(f"method {method!r} needs a category for token indices {list(word)}")
        return _maps.concept_map(self, idx, method, relevance, category, k,
                                 item=self.item(prompt_index, image_index), size=size)

    def heads(self, word: str | Sequence[int], prompt_index: int = 0, image_index: int = 0, occurrence: int = 0,
              size="latent"):
        """Per-head maps of a word: ``HeadMaps(names, maps [H, h, w])``, at the largest latent grid by default."""
        from auditor.engine import maps as _maps

        idx = self._indices(word, prompt_index, occurrence)
        t = _maps.head_maps(self, idx, item=self.item(prompt_index, image_index), size=size)
        return _maps.HeadMaps(self.head_names, t.cpu().numpy())

    def token_head_maps(self, token_indices: Sequence[int], item: int = 0, size="image") -> torch.Tensor:
        """[H, h, w] per-head maps summed over ``token_indices`` (mean over counted steps), on the CPU."""
        from auditor.engine import maps as _maps

        return _maps.head_maps(self, list(token_indices), item=item, size=size).cpu()

    def _indices(self, word, prompt_index, occurrence) -> tuple[int, ...]:
        if not self.buffers:
            raise AuditorError("nothing was traced: call the pipeline inside the `with trace(pipe)` block")
        if isinstance(word, str):
            return self.token_indices(word, prompt_index, occurrence)
        return tuple(int(i) for i in word)

    def _relevance(self):
        """The head ranking selective maps use: the one given, else the model's audit profile's (shipped beside it
        or cached for its fingerprint), else its cached head-relevance matrix."""
        if self.relevance is not None:
            return self.relevance
        from auditor.engine.models import fingerprint_of, folder_of
        from auditor.engine.relevance import find_for_pipe
        from auditor.profile import find  # the profile is a domain record; only its ranking is read here

        fp = fingerprint_of(self.pipe)
        stored = find(fp, folder_of(self.pipe))
        found = stored[0].maps_source if stored is not None else find_for_pipe(self.pipe, fp)
        if found is None:
            raise AuditorError("no audit profile or head-relevance matrix for this model: pass relevance=..., or "
                               "run `auditor calibrate` first (method='all_heads' needs none)")
        self.relevance = found
        return found


@contextlib.contextmanager
def trace(pipe, window: tuple[float, float] = (0.0, 1.0), tokens: Iterable[int] | None = None, relevance=None):
    """Record per-head cross-attention of every generation ``pipe`` runs inside the block (see ``Trace``)."""
    tr = Trace(pipe, window=window, tokens=tokens, relevance=relevance)
    with tapped(tr):
        yield tr
