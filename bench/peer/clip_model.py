"""
CLIP with a ViT image tower, as open_clip defines it: pre-LN residual attention blocks (nn.MultiheadAttention with
packed q/k/v), exact or quick GELU, class token, ln_pre and ln_post, image projection; the text tower with a causal
mask, argmax (EOT) pooling after ln_final and a text projection. Parameter names follow open_clip's state dict, so a
checkpoint written under those names loads with every shape checked. Built from the config JSON alone.
"""
import json
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

VISION_DEFAULTS = {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16, "head_width": 64, "mlp_ratio": 4.0}
TEXT_DEFAULTS = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12, "mlp_ratio": 4.0}


def load_config(path):
    with open(path) as f:
        raw = json.load(f)
    vision = {**VISION_DEFAULTS, **raw["vision_cfg"]}
    text = {**TEXT_DEFAULTS, **raw["text_cfg"]}
    if isinstance(vision["layers"], (list, tuple)):
        raise ValueError("only ViT image towers are built here")
    if isinstance(vision["image_size"], (list, tuple)):
        vision["image_size"] = vision["image_size"][0]
    return {"embed_dim": raw["embed_dim"], "quick_gelu": raw.get("quick_gelu", False), "vision": vision, "text": text}


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads, mlp_ratio, quick_gelu):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        act = QuickGELU() if quick_gelu else nn.GELU()
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", act), ("c_proj", nn.Linear(hidden, width))])
        )

    def forward(self, x, attn_mask=None):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, mlp_ratio, quick_gelu):
        super().__init__()
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_ratio, quick_gelu) for _ in range(layers)]
        )

    def forward(self, x, attn_mask=None):
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, v, embed_dim, quick_gelu):
        super().__init__()
        width = v["width"]
        grid = v["image_size"] // v["patch_size"]
        self.conv1 = nn.Conv2d(3, width, kernel_size=v["patch_size"], stride=v["patch_size"], bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, v["layers"], width // v["head_width"], v["mlp_ratio"], quick_gelu)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, embed_dim))

    def forward(self, images):
        x = self.conv1(images)  # [B, W, g, g]
        x = x.flatten(2).transpose(1, 2)  # [B, g*g, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class Clip(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        t = cfg["text"]
        self.visual = VisionTransformer(cfg["vision"], cfg["embed_dim"], cfg["quick_gelu"])
        self.transformer = Transformer(t["width"], t["layers"], t["heads"], t["mlp_ratio"], cfg["quick_gelu"])
        self.token_embedding = nn.Embedding(t["vocab_size"], t["width"])
        self.positional_embedding = nn.Parameter(torch.empty(t["context_length"], t["width"]))
        self.ln_final = nn.LayerNorm(t["width"])
        self.text_projection = nn.Parameter(torch.empty(t["width"], cfg["embed_dim"]))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        ctx = t["context_length"]
        # Additive mask: a token sees itself and the tokens before it.
        mask = torch.full((ctx, ctx), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)

    def encode_image(self, images):
        return self.visual(images)

    def encode_text(self, tokens):
        x = self.token_embedding(tokens) + self.positional_embedding
        x = self.ln_final(self.transformer(x, self.attn_mask))
        # The end-of-text token has the largest id in CLIP's vocabulary.
        return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ self.text_projection


def clip_loss(model, images, tokens):
    """open_clip's contrastive loss: the mean of the image-to-text and text-to-image cross-entropies."""
    image = F.normalize(model.encode_image(images), dim=-1)
    text = F.normalize(model.encode_text(tokens), dim=-1)
    logits = model.logit_scale.exp() * image @ text.T
    labels = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
