import assert from "node:assert/strict";
import {
  type ClipConfig,
  countParameters,
  expectedShapes,
  isBufferKey,
  isResNetVision,
  listModelConfigs,
  loadModelConfig,
  numel,
  parseClipConfig,
  visionHeads,
} from "../lib/nn/config.ts";
import { hfConfigToClipConfig, hfPreprocessToPreprocess } from "../lib/io/hf_keys.ts";
import { isFloatTensor, SafetensorsFile } from "../lib/io/safetensors.ts";
import { ClipError } from "../lib/errors.ts";

const MODELS = new URL("./fixtures/models/", import.meta.url).pathname;

/**
 * open_clip's published profile (docs/model_profile.csv): total, image-tower and text-tower parameters in millions,
 * rounded to two decimals.
 */
const OPEN_CLIP_PROFILE: Record<string, [number, number, number]> = {
  "ViT-B-32": [151.28, 87.85, 63.43],
  "RN50": [102.01, 38.32, 63.69],
  "RN101": [119.69, 56.26, 63.43],
  "ViT-B-16": [149.62, 86.19, 63.43],
  "RN50x4": [178.3, 87.14, 91.16],
  "ViT-L-14": [427.62, 303.97, 123.65],
  "ViT-L-14-336": [427.94, 304.29, 123.65],
};

const millions = (n: number) => Math.round(n / 1e4) / 100;

Deno.test("parameter counts agree with open_clip: ViT-B-32 exactly, the others to its published 0.01M", async () => {
  assert.equal(countParameters(await loadModelConfig("ViT-B-32")), 151_277_313);
  for (const [name, [total, image, text]] of Object.entries(OPEN_CLIP_PROFILE)) {
    const cfg = await loadModelConfig(name);
    assert.equal(millions(countParameters(cfg)), total, `${name} total`);
    let imageParams = 0;
    let textParams = 0;
    for (const [key, shape] of expectedShapes(cfg)) {
      if (isBufferKey(key)) continue;
      if (key.startsWith("visual.")) imageParams += numel(shape);
      else if (key !== "logit_scale") textParams += numel(shape);
    }
    assert.equal(millions(imageParams), image, `${name} image tower`);
    assert.equal(millions(textParams), text, `${name} text tower`);
  }
});

async function floatTensorShapes(path: string): Promise<Map<string, number[]>> {
  const file = await SafetensorsFile.open(path);
  try {
    return new Map(file.keys().filter((k) => isFloatTensor(file.info(k))).map((k) => [k, file.info(k).shape]));
  } finally {
    file.close();
  }
}

for (const model of ["vit_tiny", "rn_tiny"]) {
  Deno.test(`${model}: expectedShapes lists exactly the checkpoint's float tensors, and the counts add up`, async () => {
    const cfg = await loadModelConfig(`${MODELS}${model}/open_clip_config.json`);
    const fromFile = await floatTensorShapes(`${MODELS}${model}/open_clip_model.safetensors`);
    const expected = expectedShapes(cfg);
    assert.deepEqual([...expected.keys()].sort(), [...fromFile.keys()].sort());
    for (const [key, shape] of expected) assert.deepEqual(shape, fromFile.get(key), key);
    const fileTotal = [...fromFile.values()].reduce((a, s) => a + numel(s), 0);
    const buffers = [...fromFile].filter(([k]) => isBufferKey(k)).reduce((a, [, s]) => a + numel(s), 0);
    // Parameters exclude BatchNorm's running statistics, which are buffers (vit_tiny has none).
    assert.equal(countParameters(cfg), fileTotal - buffers);
    assert.equal(buffers > 0, model === "rn_tiny");
  });
}

Deno.test("fixture configs: heads and tower types read as open_clip reads them", async () => {
  const vit = await loadModelConfig(`${MODELS}vit_tiny/open_clip_config.json`);
  const rn = await loadModelConfig(`${MODELS}rn_tiny/open_clip_config.json`);
  assert.equal(isResNetVision(vit.vision_cfg), false);
  assert.equal(visionHeads(vit.vision_cfg), 2);
  assert.equal(isResNetVision(rn.vision_cfg), true);
  assert.equal(visionHeads(rn.vision_cfg), 8); // attention pool: 16 * 32 / 64
  assert.equal(rn.quick_gelu, false);
  assert.equal(vit.quick_gelu, true);
});

Deno.test("built-in configs: open_clip's values, quick_gelu only where stated, emoji-tiny as specified", async () => {
  const names = listModelConfigs();
  for (
    const n of [
      "ViT-B-32",
      "ViT-B-16",
      "ViT-L-14",
      "ViT-L-14-336",
      "RN50",
      "RN101",
      "RN50x4",
      "emoji-tiny",
      "test-vit-micro",
      "test-rn-micro",
    ]
  ) {
    assert.ok(names.includes(n), n);
  }
  for (const n of names) {
    const cfg = await loadModelConfig(n);
    assert.equal(cfg.quick_gelu, false, `${n}: open_clip's base configs use GELU; pretrained tags switch QuickGELU on`);
  }
  const emoji = await loadModelConfig("emoji-tiny");
  assert.deepEqual(emoji, {
    embed_dim: 128,
    quick_gelu: false,
    vision_cfg: { image_size: 64, layers: 4, width: 128, patch_size: 8, head_width: 32, mlp_ratio: 4 },
    text_cfg: { context_length: 32, vocab_size: 49408, width: 128, heads: 4, layers: 4, mlp_ratio: 4 },
  });
  assert.equal(visionHeads(emoji.vision_cfg), 4);
  const rn50x4 = await loadModelConfig("RN50x4");
  assert.deepEqual(rn50x4.vision_cfg, {
    image_size: 288,
    layers: [4, 6, 10, 6],
    width: 80,
    patch_size: null,
    head_width: 64,
  });
  assert.equal(expectedShapes(rn50x4).get("visual.attnpool.positional_embedding")!.join("x"), "82x2560"); // (288/32)^2 + 1
  // Loaded configs are copies: changing one does not change the next.
  (await loadModelConfig("ViT-B-32")).embed_dim = 1;
  assert.equal((await loadModelConfig("ViT-B-32")).embed_dim, 512);
});

Deno.test("defaults are open_clip's when fields are left out", () => {
  const cfg = parseClipConfig({
    embed_dim: 8,
    vision_cfg: { layers: 2, width: 128, patch_size: 32 },
    text_cfg: { width: 64, heads: 2 },
  });
  assert.deepEqual(cfg, {
    embed_dim: 8,
    quick_gelu: false,
    vision_cfg: { image_size: 224, layers: 2, width: 128, patch_size: 32, head_width: 64, mlp_ratio: 4 },
    text_cfg: { context_length: 77, vocab_size: 49408, width: 64, heads: 2, layers: 12, mlp_ratio: 4 },
  });
});

Deno.test("invalid configs fail with the field and the expected type in the message", async () => {
  const base = (): Record<string, unknown> => ({
    embed_dim: 8,
    vision_cfg: { image_size: 32, layers: 2, width: 64, patch_size: 8, head_width: 32 },
    text_cfg: { context_length: 77, vocab_size: 100, width: 32, heads: 2, layers: 1 },
  });
  const cases: [(c: Record<string, unknown>) => void, RegExp][] = [
    [(c) => delete c.embed_dim, /embed_dim must be a positive integer, got nothing/],
    [(c) => c.embed_dim = 8.5, /embed_dim must be a positive integer, got 8\.5/],
    [(c) => c.quick_gelu = "yes", /quick_gelu must be a boolean, got "yes"/],
    [(c) => c.vision_cfg = 3, /vision_cfg must be an object, got 3/],
    [
      (c) => (c.vision_cfg as Record<string, unknown>).layers = "12",
      /vision_cfg\.layers must be a positive integer \(ViT\) or an array of 4/,
    ],
    [
      (c) => (c.vision_cfg as Record<string, unknown>).layers = [3, 4, 6],
      /vision_cfg\.layers must be .* array of 4 positive integers/,
    ],
    [
      (c) => (c.vision_cfg as Record<string, unknown>).head_width = 48,
      /vision_cfg\.head_width must be a divisor of width = 64, got 48/,
    ],
    [
      (c) => (c.vision_cfg as Record<string, unknown>).patch_size = 7,
      /vision_cfg\.patch_size must be a divisor of image_size = 32, got 7/,
    ],
    [
      (c) => (c.vision_cfg as Record<string, unknown>).mlp_ratio = -1,
      /vision_cfg\.mlp_ratio must be a positive number, got -1/,
    ],
    [(c) => (c.vision_cfg as Record<string, unknown>).widht = 64, /unknown field vision_cfg\.widht/],
    [
      (c) => (c.text_cfg as Record<string, unknown>).heads = 3,
      /text_cfg\.heads must be a divisor of width = 32, got 3/,
    ],
    [
      (c) => (c.text_cfg as Record<string, unknown>).context_length = null,
      /text_cfg\.context_length must be a positive integer, got null/,
    ],
    [
      (c) => (c.text_cfg as Record<string, unknown>).pool_type = "first",
      /text_cfg\.pool_type must be "argmax" \(other values are not supported\), got "first"/,
    ],
    [
      (c) => (c.text_cfg as Record<string, unknown>).hf_model_name = "roberta-base",
      /text_cfg\.hf_model_name must be null/,
    ],
    [(c) => c.init_logit_bias = -10, /init_logit_bias must be null/],
    [
      (c) => c.vision_cfg = { image_size: 50, layers: [1, 1, 1, 1], width: 16, patch_size: null },
      /vision_cfg\.image_size must be a multiple of 32/,
    ],
    [
      (c) => c.vision_cfg = { image_size: 64, layers: [1, 1, 1, 1], width: 16, patch_size: 8 },
      /vision_cfg\.patch_size must be null for a ResNet/,
    ],
  ];
  for (const [edit, pattern] of cases) {
    const cfg = base();
    edit(cfg);
    assert.throws(() => parseClipConfig(cfg, "my.json"), (e: unknown) => {
      assert.ok(e instanceof ClipError);
      assert.match(e.message, /model config 'my\.json'/);
      assert.match(e.message, pattern);
      return true;
    });
  }
  // Fields open_clip writes at their defaults are accepted.
  const ok = base();
  Object.assign(ok.text_cfg as object, { pool_type: "argmax", proj_bias: false, output_tokens: false });
  Object.assign(ok.vision_cfg as object, { patch_dropout: 0.0, ls_init_value: null });
  assert.equal(parseClipConfig(ok).embed_dim, 8);

  await assert.rejects(loadModelConfig("ViT-Q-99"), /neither a built-in config \(ViT-B-32, .*\) nor an existing file/);
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeTextFile(`${dir}/broken.json`, "{ embed_dim: 8 ");
    await assert.rejects(loadModelConfig(`${dir}/broken.json`), /broken\.json' is not valid JSON/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("transformers config.json and preprocessor_config.json translate to vit_tiny's open_clip config", async () => {
  const hfJson = JSON.parse(await Deno.readTextFile(`${MODELS}vit_tiny_hf/config.json`));
  const hubJson = JSON.parse(await Deno.readTextFile(`${MODELS}vit_tiny/open_clip_config.json`));
  const expected: ClipConfig = parseClipConfig(hubJson.model_cfg);
  const cfg = hfConfigToClipConfig(hfJson);
  assert.deepEqual(cfg, expected);
  const pre = hfPreprocessToPreprocess(
    JSON.parse(await Deno.readTextFile(`${MODELS}vit_tiny_hf/preprocessor_config.json`)),
    cfg,
  );
  assert.deepEqual(pre, {
    size: 32,
    mean: hubJson.preprocess_cfg.mean,
    std: hubJson.preprocess_cfg.std,
    interpolation: "bicubic",
    resize_mode: "shortest",
  });

  const gelu = structuredClone(hfJson);
  gelu.text_config.hidden_act = gelu.vision_config.hidden_act = "gelu";
  assert.equal(hfConfigToClipConfig(gelu).quick_gelu, false);
  const mixed = structuredClone(hfJson);
  mixed.text_config.hidden_act = "gelu";
  assert.throws(() => hfConfigToClipConfig(mixed), /different activations \(gelu vs quick_gelu\)/);
  const relu = structuredClone(hfJson);
  relu.vision_config.hidden_act = relu.text_config.hidden_act = "relu";
  assert.throws(() => hfConfigToClipConfig(relu), /text_config\.hidden_act is "relu"/);
  const eps = structuredClone(hfJson);
  eps.vision_config.layer_norm_eps = 1e-6;
  assert.throws(() => hfConfigToClipConfig(eps), /vision_config\.layer_norm_eps is 0\.000001/);
  assert.throws(() => hfConfigToClipConfig({ ...hfJson, model_type: "siglip" }), /model_type is "siglip"/);
  // transformers' own defaults fill a sparse config: the openai/clip-vit-base-patch32 shape.
  assert.deepEqual(
    hfConfigToClipConfig({ model_type: "clip", text_config: {}, vision_config: {} }),
    await loadModelConfig("ViT-B-32").then((c) => ({ ...c, quick_gelu: true })),
  );
});
