"""GPU throughput, peak memory and capture overhead on randomly initialised SD1.5- and SDXL-sized UNets and a
Flux-sized transformer.

A prepared script for a lent GPU machine (it has not run yet: none has been lent; docs/benchmarks.md says so until
bench/results/gpu.json exists). For each UNet size (SD1.5: 860M parameters, 16 cross-attention layers; SDXL: 2.6B,
70 layers), image side (512, 1024), batch (1, 4, 8) and dtype (fp16, bf16) it times the denoising loop with
classifier-free guidance (the UNet evaluated on 2 x batch latents per step, a stand-in scheduler step) without and
with ``auditor.trace``, in interleaved pairs, and records:

- images/s of the denoising loop (VAE and text encoders, a fixed cost per image, are not in it);
- peak GPU memory without and with the trace, and the trace's own buffers (``Trace.nbytes``);
- capture overhead: the median traced / plain time over the pairs (issue 20's goal: <= 1.05 at SD1.5 and SDXL size).

Flux-dev's transformer (12B parameters, 19 double- and 38 single-stream blocks) runs the same way without
classifier-free guidance (its guidance is an input), on 2x2-packed latents and 512 T5 tokens.

Weights are random (no checkpoint to download; speed and memory do not depend on the values). Text embeddings are
random [2 x batch, 77, cross_attention_dim]. A configuration that runs out of memory is recorded as such.

    .venv/bin/python bench/gpu.py                      # everything (about 5 minutes on an H100-class GPU)
    .venv/bin/python bench/gpu.py --models sd15 --sides 512 --batches 1 --dtypes fp16 --pairs 2   # one cell
    .venv/bin/python bench/gpu.py --smoke              # CPU, UNets shrunk 8x: checks the script runs
    .venv/bin/python bench/gpu.py --doc-only           # rewrite its section of docs/benchmarks.md from the JSON
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

OUT = common.RESULTS / "gpu.json"
TITLE = "GPU throughput and capture overhead (issue 20)"
GOAL = 1.05
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# The published UNet configurations (diffusers' UNet2DConditionModel arguments), written out so nothing downloads.
SD15 = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
            attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, in_channels=4, out_channels=4)
SDXL = dict(block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
            attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, in_channels=4, out_channels=4)
# Flux-dev's transformer (12B parameters: 19 double-stream and 38 single-stream blocks of 24 heads, guidance embedded)
FLUX = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56))
FLUX_SMOKE = dict(FLUX, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                  joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
FLUX_TEXT = 512  # T5 tokens Flux-dev's pipeline reads
MODELS = {"sd15": SD15, "sdxl": SDXL, "flux": FLUX}


def shrink(config: dict, factor: int = 8) -> dict:
    """A smaller UNet of the same shape (channels / factor, at most 2 transformer layers) for the CPU smoke run."""
    c = dict(config)
    c["block_out_channels"] = tuple(max(32, ch // factor) for ch in c["block_out_channels"])
    if "transformer_layers_per_block" in c:
        c["transformer_layers_per_block"] = tuple(min(2, n) for n in c["transformer_layers_per_block"])
    c["cross_attention_dim"] = max(32, c["cross_attention_dim"] // factor)
    if "projection_class_embeddings_input_dim" in c:  # text_embeds (1280 / factor) + 6 time ids x 256 / factor
        c["addition_time_embed_dim"] = 256 // factor
        c["projection_class_embeddings_input_dim"] = 1280 // factor + 6 * (256 // factor)
    c["norm_num_groups"] = 8
    return c


class Loop:
    """The attributes of a diffusers pipeline that ``auditor.trace`` reads, around a bare UNet (guided) or Flux
    transformer (guidance distilled into the model: one evaluation per step)."""

    vae_scale_factor = 8

    def __init__(self, net, steps: int):
        self._num_timesteps = steps
        self.flux = not hasattr(net.config, "block_out_channels")
        self.do_classifier_free_guidance = not self.flux
        if self.flux:
            self.transformer = net
        else:
            self.unet = net


def inputs(loop: Loop, batch: int, side: int, device, dtype, text_embeds: int):
    """The arguments of ``denoise`` for one call: a UNet's latents, text states and (SDXL) added conditions with
    guidance (2 x batch); Flux's packed latents, T5 states, pooled vector and positions."""
    if loop.flux:
        return flux_inputs(loop.transformer, batch, side, device, dtype)
    unet = loop.unet
    g = torch.Generator("cpu").manual_seed(0)
    lat = torch.randn(batch, 4, side // 8, side // 8, generator=g).to(device, dtype)
    text = torch.randn(2 * batch, 77, unet.config.cross_attention_dim, generator=g).to(device, dtype)
    added = None
    if unet.config.addition_embed_type == "text_time":
        added = {"text_embeds": torch.randn(2 * batch, text_embeds, generator=g).to(device, dtype),
                 "time_ids": torch.tensor([[side, side, 0, 0, side, side]] * 2 * batch, device=device, dtype=dtype)}
    return lat, text, added


def flux_inputs(net, batch: int, side: int, device, dtype):
    """Flux's inputs: 2x2-packed latents [batch, (side/16)^2, 64], T5 states, the pooled CLIP vector, image and text
    positions, the distilled guidance."""
    g = torch.Generator("cpu").manual_seed(0)
    h = w = side // 16
    lat = torch.randn(batch, h * w, net.config.in_channels, generator=g).to(device, dtype)
    text = torch.randn(batch, FLUX_TEXT, net.config.joint_attention_dim, generator=g).to(device, dtype)
    pooled = torch.randn(batch, net.config.pooled_projection_dim, generator=g).to(device, dtype)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(device, dtype)
    txt_ids = torch.zeros(FLUX_TEXT, 3, device=device, dtype=dtype)
    return lat, text, {"pooled_projections": pooled, "img_ids": img_ids, "txt_ids": txt_ids,
                       "guidance": torch.full((batch,), 3.5, device=device, dtype=torch.float32)}


@torch.inference_mode()
def denoise(loop: Loop, lat, text, added, steps: int) -> None:
    if loop.flux:
        for i in range(steps):
            sigma = torch.full((lat.shape[0],), 1.0 - i / steps, device=lat.device)
            v = loop.transformer(hidden_states=lat, encoder_hidden_states=text, timestep=sigma, return_dict=False,
                                 **added)[0]
            lat = lat - v / steps  # a stand-in for the flow-matching step: same shapes, no cost
        return
    for i in range(steps):
        t = torch.full((lat.shape[0] * 2,), 999 - i * (1000 // steps), device=lat.device)
        eps = loop.unet(torch.cat([lat, lat]), t, encoder_hidden_states=text, added_cond_kwargs=added).sample
        uncond, cond = eps.chunk(2)
        lat = lat - 0.01 * (uncond + 7.5 * (cond - uncond))  # a stand-in for the scheduler: same shapes, no cost


def timed(loop: Loop, args: tuple, steps: int, traced: bool, device) -> tuple[float, int, int]:
    """(seconds, peak bytes, trace bytes) of one denoising loop."""
    from auditor import trace

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    nbytes = 0
    if traced:
        with trace(loop) as tr:
            denoise(loop, *args, steps)
        nbytes = tr.nbytes()
    else:
        denoise(loop, *args, steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return time.perf_counter() - t, peak, nbytes


def cell(loop: Loop, batch: int, side: int, dtype, steps: int, pairs: int, device, text_embeds: int) -> dict:
    """One configuration: interleaved plain/traced pairs after a warm-up of each."""
    args = inputs(loop, batch, side, device, dtype, text_embeds)
    timed(loop, args, 1, False, device), timed(loop, args, 1, True, device)  # warm-up: kernels, allocator
    plain, traced, peaks, nbytes = [], [], [0, 0], 0
    for i in range(pairs):
        for is_traced in ((False, True) if i % 2 == 0 else (True, False)):  # alternate which goes first
            s, peak, nb = timed(loop, args, steps, is_traced, device)
            (traced if is_traced else plain).append(s)
            peaks[is_traced] = max(peaks[is_traced], peak)
            nbytes = max(nbytes, nb)
    ratio = statistics.median(t / p for t, p in zip(traced, plain))
    return {"images_per_s_plain": round(batch * pairs / sum(plain), 3),
            "images_per_s_traced": round(batch * pairs / sum(traced), 3),
            "overhead_traced_over_plain": round(ratio, 3),
            "peak_gib_plain": round(peaks[0] / 2**30, 2), "peak_gib_traced": round(peaks[1] / 2**30, 2),
            "trace_buffers_gib": round(nbytes / 2**30, 3)}


def build(name: str, smoke: bool, device, dtype):
    """A randomly initialised denoiser of the named size (shrunk for the CPU smoke run)."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    torch.manual_seed(0)
    # made on the device in the target dtype: Flux's 12B parameters in float32 on the host would take 48 GB
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            if name == "flux":
                net = FluxTransformer2DModel(**(FLUX_SMOKE if smoke else FLUX))
            else:
                net = UNet2DConditionModel(**(shrink(MODELS[name]) if smoke else MODELS[name]))
    finally:
        torch.set_default_dtype(previous)
    return net.eval()


def run(args) -> list[dict]:
    from auditor.engine.heads import text_attention_modules

    device = torch.device("cpu" if args.smoke else "cuda")
    rows = []
    for name in args.models:
        text_embeds = 1280 // 8 if args.smoke else 1280
        for dname in args.dtypes:
            unet = build(name, args.smoke, device, DTYPES[dname])
            layers = text_attention_modules(unet)
            meta = {"model": name, "dtype": dname, "parameters_m": round(sum(p.numel() for p in unet.parameters()) / 1e6),
                    "text_attention_layers": len(layers), "heads": sum(int(m.heads) for _, m in layers)}
            for side in args.sides:
                for batch in args.batches:
                    row = {**meta, "side": side, "batch": batch, "steps": args.steps}
                    try:
                        row.update(cell(Loop(unet, args.steps), batch, side, DTYPES[dname], args.steps, args.pairs,
                                        device, text_embeds))
                    except torch.OutOfMemoryError:
                        row["error"] = "out of memory"
                        torch.cuda.empty_cache()
                    print(json.dumps(row), flush=True)
                    rows.append(row)
            del unet
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def section(r: dict | None) -> str:
    L = [f"## {TITLE}", ""]
    if r is None:
        return "\n".join(L + [
            "**Not run yet**: no GPU has been lent to this project. `bench/gpu.py` is prepared for one: on randomly "
            "initialised SD1.5- and SDXL-sized UNets and a Flux-sized transformer at 512 and 1024 px, batch 1/4/8, fp16 and bf16, it measures "
            "images/s of the denoising loop, peak GPU memory with and without the trace, the trace's buffers, and the "
            f"capture overhead (goal: traced / plain ≤ {GOAL} at SD1.5 and SDXL size). On a GPU machine: "
            "`.venv/bin/python bench/gpu.py` writes bench/results/gpu.json and replaces this section. "
            "(`--smoke` runs it on the CPU with UNets shrunk 8x; that checks the script, not the GPU.)"]) + "\n"
    from report import machine_line

    L += [f"`{r['command']}`; {machine_line(r)}; GPU: {r.get('gpu', '?')}. Denoising loop only (random weights, "
          f"{r['rows'][0]['steps']} steps, guidance doubling the UNet batch).", "",
          "| UNet | dtype | side | batch | images/s plain | images/s traced | overhead | peak GiB plain / traced | "
          "trace GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        if "error" in x:
            L.append(f"| {x['model']} | {x['dtype']} | {x['side']} | {x['batch']} | {x['error']} | | | | |")
            continue
        L.append(f"| {x['model']} ({x['heads']} heads) | {x['dtype']} | {x['side']} | {x['batch']} | "
                 f"{x['images_per_s_plain']} | {x['images_per_s_traced']} | {x['overhead_traced_over_plain']} | "
                 f"{x['peak_gib_plain']} / {x['peak_gib_traced']} | {x['trace_buffers_gib']} |")
    worst = max((x["overhead_traced_over_plain"] for x in r["rows"] if "error" not in x), default=None)
    L += ["", f"Capture overhead goal ≤ {GOAL}: worst cell {worst} — "
              f"{'met' if worst is not None and worst <= GOAL else '**not met**'}."]
    return "\n".join(L) + "\n"


def write_doc(r: dict | None) -> None:
    from report import DOC, replace_section

    DOC.write_text(replace_section(DOC.read_text(), TITLE, section(r)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--sides", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=list(DTYPES))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="CPU, shrunk UNets, 64 px: checks the script runs")
    ap.add_argument("--doc-only", action="store_true")
    args = ap.parse_args()
    if args.doc_only:
        write_doc(json.loads(OUT.read_text()) if OUT.is_file() else None)
        return
    if args.smoke:
        args.sides, args.batches, args.steps, args.pairs, args.dtypes = [64], [1, 2], 2, 1, ["fp32"]
    elif not torch.cuda.is_available():
        sys.exit("bench/gpu.py: no CUDA GPU here (use --smoke to check the script on the CPU)")
    rows = run(args)
    if args.smoke:
        print(f"smoke run: {len(rows)} cells ran; nothing written")
        return
    r = {"command": common.command(), "commit": common.git_commit(), "machine": common.machine(),
         "gpu": torch.cuda.get_device_name(0), "rows": rows}
    OUT.write_text(json.dumps(r, indent=1))
    write_doc(r)


if __name__ == "__main__":
    main()
