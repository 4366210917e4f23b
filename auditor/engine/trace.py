"""The reading API: what a user holds after tracing a generation, and the maps read from it.

``with trace(pipe) as tr: pipe(prompt, ...)`` records through ``auditor.engine.capture`` (the recorder) into a
``Trace``; ``tr.maps(word)``, ``tr.concept(word)`` and ``tr.heads(word)`` read it. ``trace_image`` fills the same
``Trace`` from an image that already exists (``auditor.engine.image_read``).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from auditor.align import text_sequence, word_indices
from auditor.engine import image_read as ir
from auditor.engine import maps as _maps
from auditor.engine.capture import Tap, tapped
from auditor.engine.models import fingerprint_of
from auditor.engine.categories import category_of
from auditor.engine.relevance import find_for_pipe
from auditor.errors import AuditorError


class Trace(Tap):
    """Per-layer sums of cross-attention probabilities of the latest generation, and the maps built from them.

    ``buffers[layer]`` is ``[items, heads, h*w, T]`` (float32, model device): item ``p * images_per_prompt + i`` is
    image ``i`` of prompt ``p``; T is every token column of the text sequence, only ``tokens`` when given, or with
    ``tokens="prompt"`` the columns the traced prompts' own tokens fill (start, words and end of each encoder's
    segment, no padding). Sums run over the counted steps (``steps_counted``); maps divide by it.
    """

    def __init__(self, pipe, window=(0.0, 1.0), tokens: Iterable[int] | str | None = None, relevance=None,
                 free_passes: bool = False, find_ranking: Callable | None = None):
        super().__init__(pipe, window, free_passes)
        self.find_ranking = find_ranking  # pipe -> the ranking selective maps use when none is given
        self.reading = None  # an ImageReading when the trace was read from a given image (trace_image)
        self.prompt_columns = isinstance(tokens, str)
        if self.prompt_columns and tokens != "prompt":
            raise AuditorError(f"tokens must be token indices or 'prompt', got {tokens!r}")
        self.columns: tuple[int, ...] | None = None
        if tokens is not None and not self.prompt_columns:
            self.columns = tuple(sorted({int(t) for t in tokens}))
            if not self.columns or self.columns[0] < 0:
                raise AuditorError(f"tokens must be non-negative token indices, got {tokens!r}")
        self.relevance = relevance
        self._buffers: dict[str, torch.Tensor] = {}
        self.seq_len: int | None = None

    sums_only = True  # on_attention adds each call's probabilities to its layer's sum, nothing else

    @property
    def buffers(self) -> dict[str, torch.Tensor]:
        """Layer name -> its sum ``[items, heads, h*w, T]`` (calls the recorder kept waiting are scored first)."""
        self.flush()
        return self._buffers

    def reset(self) -> None:
        self._buffers = {}
        if self.prompt_columns:
            self.columns = None  # the next generation's prompts decide

    def kept_columns(self, total: int) -> tuple[int, ...] | None:
        self.seq_len = int(total)
        if self.prompt_columns and self.columns is None and self.prompts:
            self.columns = self._prompt_token_columns()
        return self.columns

    def _prompt_token_columns(self) -> tuple[int, ...]:
        """Every column some traced prompt's tokens fill, in any encoder's segment (padding is the rest)."""
        cols: set[int] = set()
        for i in range(len(self.prompts)):
            padding = set(self.special_tokens(i)["padding"])
            second = self._prompt_2(i)
            if second is not None:  # SDXL's second prompt fills columns by its own length
                n = len(self.pipe.tokenizer_2(second, truncation=True)["input_ids"])
                padding -= set(range(n))
            cols.update(c for c in range(self.seq_len) if c not in padding)
        return tuple(sorted(cols))

    def on_attention(self, layer_index, attn, query, probs, rows, n) -> None:
        name = self.head_index.layers[layer_index]
        shape = (probs.shape[0], probs.shape[1], n, probs.shape[3])
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape:
            # (a shape change means a new resolution or batch without a new encode_prompt: start this layer over)
            buf = self._buffers[name] = torch.zeros(shape, dtype=torch.float32, device=probs.device)
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
    def image_size(self) -> tuple[int, int] | None:
        """(height, width) maps come back at: the generated image's, or the given image's own size."""
        return self.reading.given_size if self.reading is not None else super().image_size

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
            kept = "the prompts' own tokens" if self.prompt_columns else "tokens=..."
            raise AuditorError(f"token {token} was not recorded (the trace kept {kept}: {list(self.columns)})") from None

    def token_indices(self, word: str, prompt_index: int = 0, occurrence: int = 0) -> tuple[int, ...]:
        """Token indices of ``word`` in the traced prompt (via ``auditor.align``)."""
        if not self.prompts:
            raise AuditorError("the traced call gave no prompt text (prompt_embeds?): use token indices instead")
        if self.tokenizer is None:
            raise AuditorError("the pipeline has no tokenizer to locate words: use token indices instead")
        prompt = self.prompts[prompt_index]
        second = self._prompt_2(prompt_index)
        if self.transformer:
            return self._transformer_indices(word, prompt, second, occurrence)
        if second is None:
            try:
                span = word_indices(prompt, word, self.tokenizer, occurrence)
            except KeyError as exc:
                raise AuditorError(str(exc.args[0])) from None
            if not span.indices:
                raise AuditorError(f"{word!r} falls past the text encoder's token limit in {prompt!r}")
            return span.indices
        return self._indices_of_two(word, prompt, second, occurrence)

    def _transformer_indices(self, word: str, prompt: str, second: str | None, occurrence: int) -> tuple[int, ...]:
        """A word's columns of a transformer's text sequence (``auditor.align.text_sequence``): SD3's CLIP and T5
        columns, Flux's and PixArt's T5 ones. The T5 length is read off the traced sequence."""
        if second is not None:
            raise AuditorError(f"{word!r}: prompt_2 {second!r} differs from the prompt, and the second CLIP encoder "
                               f"shares the first one's columns; pass token indices, or leave prompt_2 unset")
        try:
            span = word_indices(prompt, word, self._text_sequence(), occurrence)
        except KeyError as exc:
            raise AuditorError(str(exc.args[0])) from None
        if not span.indices:
            raise AuditorError(f"{word!r} falls past the text encoders' token limit in {prompt!r}")
        return span.indices

    def _text_sequence(self):
        """The transformer's text sequence as traced (``auditor.align.text_sequence``), its T5 length read off the
        recorded columns."""
        sd3 = type(self.pipe).__name__.startswith("StableDiffusion3")
        clip = int(getattr(self.pipe, "tokenizer_max_length", 77) or 77) if sd3 else 0
        return text_sequence(self.pipe, None if self.seq_len is None else self.seq_len - clip)

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
        """Token indices of the start token, end token and padding of a traced prompt (their maps on request); for a
        transformer, those of every text encoder's segment of its sequence (SD3: CLIP's and T5's)."""
        prompt = self.prompts[prompt_index]
        if self.transformer:
            segments = [(s.tokenizer, s.offset, s.length) for s in self._text_sequence().segments]
        else:
            segments = [(self.tokenizer, 0, self.seq_len or getattr(self.tokenizer, "model_max_length", 77))]
        out: dict[str, list[int]] = {"start": [], "end": [], "padding": []}
        for tok, offset, length in segments:
            ids = tok(prompt, truncation=True, max_length=length)["input_ids"]
            if ids and ids[0] == getattr(tok, "bos_token_id", None):  # T5 has no start token
                out["start"].append(offset)
            out["end"].append(offset + len(ids) - 1)
            out["padding"] += list(range(offset + len(ids), offset + length))
        return out

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
        idx = self._indices(word, prompt_index, occurrence)
        if method != "all_heads":
            relevance = relevance or self._relevance()
            if category is None:
                if isinstance(word, str):
                    category = category_of(word, self.pipe, relevance.category_limit).category
                else:
                    raise AuditorError(f"method {method!r} needs a category for token indices {list(word)}")
        return _maps.concept_map(self, idx, method, relevance, category, k,
                                 item=self.item(prompt_index, image_index), size=size)

    def heads(self, word: str | Sequence[int], prompt_index: int = 0, image_index: int = 0, occurrence: int = 0,
              size="latent"):
        """Per-head maps of a word: ``HeadMaps(names, maps [H, h, w])``, at the largest latent grid by default."""
        idx = self._indices(word, prompt_index, occurrence)
        t = _maps.head_maps(self, idx, item=self.item(prompt_index, image_index), size=size)
        return _maps.HeadMaps(self.head_names, t.cpu().numpy())

    def token_head_maps(self, token_indices: Sequence[int], item: int = 0, size="image") -> torch.Tensor:
        """[H, h, w] per-head maps summed over ``token_indices`` (mean over counted steps), on the CPU."""
        return _maps.head_maps(self, list(token_indices), item=item, size=size).cpu()

    def _indices(self, word, prompt_index, occurrence) -> tuple[int, ...]:
        if not self.buffers:
            raise AuditorError("nothing was traced: call the pipeline inside the `with trace(pipe)` block")
        if isinstance(word, str):
            return self.token_indices(word, prompt_index, occurrence)
        return tuple(int(i) for i in word)

    def _relevance(self):
        """The head ranking selective maps use: the one given, else what ``find_ranking`` finds for the pipeline
        (``auditor.trace`` looks in the model's audit profile), else its cached head-relevance matrix."""
        if self.relevance is not None:
            return self.relevance
        found = (self.find_ranking or cached_relevance)(self.pipe)
        if found is None:
            raise AuditorError("no audit profile or head-relevance matrix for this model: pass relevance=..., or "
                               "run `auditor calibrate` first (method='all_heads' needs none)")
        self.relevance = found
        return found


def cached_relevance(pipe):
    """The head-relevance matrix cached for the pipeline's weights, or None."""
    return find_for_pipe(pipe, fingerprint_of(pipe))


@contextlib.contextmanager
def trace(pipe, window: tuple[float, float] = (0.0, 1.0), tokens: Iterable[int] | str | None = None, relevance=None,
          find_ranking: Callable | None = None):
    """Record per-head cross-attention of every generation ``pipe`` runs inside the block.

    Args:
        pipe: a diffusers text-to-image pipeline: UNet (Stable Diffusion 1.x/2.x, SDXL) or transformer (SD3/SD3.5,
            Flux, PixArt-α/Σ: the image queries' attention on the text keys, maps on the patch grid).
        window: the fraction of denoising steps recorded, (start, end) with 0 <= start < end <= 1.
        tokens: token indices to keep (all of the text sequence when None; fewer columns, less memory), or
            "prompt": the columns the prompts' own tokens fill, padding left out (a transformer's recorder then
            computes only those columns' probabilities).
        relevance: the head ranking selective maps use.
        find_ranking: ``pipe -> ranking`` used when ``relevance`` is None (``auditor.trace`` passes the audit
            profile's lookup); by default the head-relevance matrix cached for the model.

    Returns:
        A context manager yielding the ``Trace`` of the latest generation made inside the block. The pipeline's
        attention processors are restored on exit, also when generation raises.

    Example:
        >>> from auditor import trace
        >>> from auditor.engine.models import load_model
        >>> pipe = load_model("shapes-v1", device="cpu").pipe
        >>> with trace(pipe) as tr:
        ...     image = pipe("a red circle", num_inference_steps=4).images[0]
        >>> tr.maps("circle", method="all_heads").shape == (image.height, image.width)
        True
    """
    tr = Trace(pipe, window=window, tokens=tokens, relevance=relevance, find_ranking=find_ranking)
    with tapped(tr):
        yield tr


def trace_image(pipe, image, prompt: str, timesteps: Sequence[int] | None = None, seed: int = 0, draws: int = 1,
                tokens: Iterable[int] | str | None = None, relevance=None, prompt_2: str | None = None,
                size: tuple[int, int] | None = None, find_ranking: Callable | None = None,
                text_kwargs: dict | None = None) -> Trace:
    """Read per-head cross-attention from an image that already exists, without generating one.

    The image is encoded by ``pipe``'s VAE, noised to each of ``timesteps`` with seeded noise, and the denoiser
    runs once per noised copy with ``prompt`` (see ``auditor.engine.image_read``); the probabilities are summed
    over those passes as a generation's are over its steps.

    Args:
        pipe: a diffusers text-to-image pipeline (Stable Diffusion 1.x/2.x, SDXL, PixArt, SD3, Flux).
        image: a PIL image, a path, or an HxWx3 uint8 array; any size at least the model's reading size.
        prompt: the text to read the image with (the prompt it was made from, for an audit).
        timesteps: training-schedule timesteps to noise the image to (``image_read.default_timesteps``: 30%, 50%
            and 70% of the schedule).
        seed: seeds the noise, so a reading is reproducible.
        draws: noised copies per timestep (more: less noise in the maps, one denoiser pass each).
        tokens, relevance, find_ranking: as for ``trace``.
        text_kwargs: passed to the pipeline's ``encode_prompt`` (e.g. ``max_sequence_length`` for T5 encoders).
        prompt_2: SDXL's second-encoder prompt.
        size: (height, width) to read at, multiples of the model's grid unit; by default the model's own pixel
            count with the image's aspect ratio.

    Returns:
        A ``Trace`` (the reading API of ``trace``) whose maps come back at the given image's size, with
        ``tr.reading`` recording how it was read.

    Example:
        >>> from auditor import trace_image
        >>> from auditor.engine.models import load_model
        >>> pipe = load_model("shapes-v1", device="cpu").pipe
        >>> image = pipe("a red circle", num_inference_steps=4).images[0]
        >>> tr = trace_image(pipe, image, "a red circle")
        >>> tr.maps("circle", method="all_heads").shape == (image.height, image.width)
        True
    """
    img = ir.load_image(image)
    given = (img.height, img.width)
    if size is None:
        size = ir.read_size(pipe, given)
    else:
        unit = ir.grid_unit(pipe)
        if any(int(v) < unit or int(v) % unit for v in size):
            raise AuditorError(f"size {tuple(size)} must be positive multiples of {unit} pixels for this model")
        size = (int(size[0]), int(size[1]))
    ts = ir.check_timesteps(pipe, ir.default_timesteps(pipe) if timesteps is None else timesteps)
    if int(draws) < 1:
        raise AuditorError(f"draws must be at least 1, got {draws}")
    tr = Trace(pipe, tokens=tokens, relevance=relevance, free_passes=True, find_ranking=find_ranking)
    latent = ir.encode_image(pipe, img.resize((size[1], size[0]), resample=3) if (img.height, img.width) != size
                             else img, size)
    with tapped(tr):
        states, extra = ir.conditioning(pipe, prompt, prompt_2, size, text_kwargs)
        ir.run_passes(pipe, latent, states, extra, ts, seed, int(draws))
    tr.reading = ir.ImageReading(ts, int(seed), int(draws), size, given)
    return tr
