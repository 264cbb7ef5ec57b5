"""The bench's model-side workloads in PyTorch; each returns rows {name: {value, unit, note}} and optional checks."""
import math
import statistics

import torch
import torch.nn.functional as F

from clip_model import Clip, clip_loss, load_config
from safetensors_io import load_into, read_all
from timing import peak_rss_mib, time_calls, time_per_op


def _rand(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g) * 2 - 1


def _row(value, unit, note):
    return {"value": value, "unit": unit, "note": note}


def matmul_rows(cases):
    rows = {}
    for c in cases:
        lead = [c["batch"]] if c["batch"] > 1 else []
        a = _rand(*lead, c["m"], c["k"], seed=1)
        b = _rand(*lead, *((c["n"], c["k"]) if c.get("transB") else (c["k"], c["n"])), seed=2)
        bias = _rand(c["n"], seed=3) if c.get("bias") else None
        if c.get("bias") or c.get("activation"):
            # The Linear-layer form: weight [N, K], bias and activation in the same call chain.
            act = {"gelu": F.gelu, None: lambda x: x}[c.get("activation")]
            fn = lambda: act(F.linear(a, b, bias))
        elif c.get("transB"):
            fn = lambda: torch.matmul(a, b.transpose(-1, -2))
        else:
            fn = lambda: torch.matmul(a, b)
        seconds, n = time_per_op(fn)
        flop = 2 * c["batch"] * c["m"] * c["n"] * c["k"]
        rows[c["name"]] = _row(flop / seconds / 1e9, "GFLOP/s", f"{seconds * 1e3:.2f} ms each, {n} per run")
    return rows


def elementwise_rows(spec):
    a, b = _rand(spec["size"], seed=4), _rand(spec["size"], seed=5)
    seconds, n = time_per_op(lambda: a + b)
    return {spec["name"]: _row(3 * spec["size"] * 4 / seconds / 1e9, "GB/s", f"a + b, {n} per run")}


def attention_rows(spec):
    shape = (spec["images"] * spec["heads"], spec["tokens"], spec["headWidth"])
    q, k, v = (_rand(*shape, seed=s).requires_grad_() for s in (1, 2, 3))
    upstream = _rand(*shape, seed=4)
    scale = 1 / math.sqrt(spec["headWidth"])

    def step():
        out = torch.softmax(torch.matmul(q, k.transpose(1, 2)) * scale, dim=-1) @ v
        out.backward(upstream)

    seconds, n = time_per_op(step)
    return {"attention_fwd_bwd": _row(spec["flop"] / seconds / 1e9, "GFLOP/s", f"{seconds * 1e3:.1f} ms each")}


def layer_norm_rows(spec):
    x = _rand(spec["rows"], spec["cols"], seed=5)
    gain, bias = _rand(spec["cols"], seed=6), _rand(spec["cols"], seed=7)
    with torch.no_grad():
        seconds, n = time_per_op(lambda: F.layer_norm(x, (spec["cols"],), gain, bias, spec["eps"]))
    return {"layer_norm": _row(spec["bytes"] / seconds / 1e9, "GB/s", f"{seconds * 1e3:.2f} ms each")}


def ops_rows(plan):
    rows = {}
    for key, fn in (
        ("matmuls", matmul_rows),
        ("elementwise", elementwise_rows),
        ("attention", attention_rows),
        ("layerNorm", layer_norm_rows),
    ):
        if key in plan:
            rows.update(fn(plan[key]))
    return rows, {}


def load_model(spec):
    model = Clip(load_config(spec["config"]))
    count = load_into(spec["weights"], model.state_dict())
    return model, count


def _batch_note(times, count):
    return f"best of {len(times)} batches (median {statistics.median(times):.2f} s); {count} tensors loaded, shapes checked"


def embed_rows(spec):
    model, count = load_model(spec)
    model.eval()
    inputs = read_all(spec["inputs"])
    images, tokens = inputs["images"], inputs["tokens"].long()
    batch = images.shape[0]
    with torch.no_grad():
        first_image = model.encode_image(images)
        image_times = time_calls(lambda: model.encode_image(images), spec["batches"])
        first_text = model.encode_text(tokens)
        text_times = time_calls(lambda: model.encode_text(tokens), spec["batches"])
    rows = {
        "vitb32_image_embed": _row(batch / min(image_times), "images/s", _batch_note(image_times, count)),
        "vitb32_text_embed": _row(batch / min(text_times), "texts/s", _batch_note(text_times, count)),
        "vitb32_embed_peak_rss": _row(peak_rss_mib(), "MiB", "VmHWM of the process (weights loaded one tensor at a time)"),
    }
    checks = {"imageEmbedding": first_image[0].tolist(), "textEmbedding": first_text[0].tolist()}
    return rows, checks


def train_rows(spec):
    model, count = load_model(spec)
    model.train()
    inputs = read_all(spec["inputs"])
    images, tokens = inputs["images"], inputs["tokens"].long()
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.2},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=spec["lr"],
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    losses = []

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = clip_loss(model, images, tokens)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())

    time_calls(step, spec["warmup"])
    times = time_calls(step, spec["steps"])
    batch = images.shape[0]
    rows = {
        "emoji_tiny_train": _row(
            batch / min(times), "samples/s", f"best of {len(times)} steps (median {statistics.median(times):.2f} s)"
        ),
        "emoji_tiny_train_peak_rss": _row(peak_rss_mib(), "MiB", "VmHWM of the process"),
    }
    return rows, {"losses": losses}
