// The float64 reference (tests/reference_clip.ts) against open_clip's outputs on the fixture models, and its loss,
// erf and AdamW on hand-computed cases. The GPU tests trust the reference only because of these checks.
import assert from "node:assert/strict";
import { assertClose, f32File, i32File } from "./helpers.ts";
import {
  erf,
  gelu,
  type Matrix,
  RefAdamW,
  refClipLoss,
  refDecays,
  refEncodeImage,
  refEncodeText,
  refLogitsPerImage,
} from "./reference_clip.ts";
import { loadStateDict, resolveCheckpoint } from "../lib/io/checkpoint_layout.ts";

const ROOT = new URL("./fixtures/models/", import.meta.url).pathname;

function maxAbs(x: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < x.length; i++) m = Math.max(m, Math.abs(x[i]));
  return m;
}

// open_clip computed the fixtures in float32; its own float32-vs-float64 check moved the features by up to 1.2e-6
// (ViT) and 3.9e-5 on rn_tiny's image features, whose values reach about 40. Hence 1e-5 relative to the largest value.
const FEATURE_RTOL_OF_MAX = 1e-5;

for (const name of ["vit_tiny", "rn_tiny"]) {
  Deno.test(`reference CLIP reproduces open_clip's ${name} features and logits`, async () => {
    const dir = `${ROOT}${name}`;
    const resolved = await resolveCheckpoint(dir);
    const state = await loadStateDict(resolved);
    const cfg = resolved.config;
    const images = await f32File(`${dir}/reference/input_images.f32`);
    const tokens = await i32File(`${dir}/reference/input_tokens.i32`);
    const image = refEncodeImage(state, cfg, images);
    const text = refEncodeText(state, cfg, tokens);
    const refImage = await f32File(`${dir}/reference/image_features.f32`);
    const refText = await f32File(`${dir}/reference/text_features.f32`);
    assert.deepEqual([image.rows, image.cols, text.rows, text.cols], [4, cfg.embed_dim, 6, cfg.embed_dim]);
    const errors = {
      image: assertClose(image.data, refImage, {
        rtol: 0,
        atol: FEATURE_RTOL_OF_MAX * Math.max(1, maxAbs(refImage)),
        what: `${name} image features`,
      }),
      text: assertClose(text.data, refText, {
        rtol: 0,
        atol: FEATURE_RTOL_OF_MAX * Math.max(1, maxAbs(refText)),
        what: `${name} text features`,
      }),
      logits: assertClose(
        refLogitsPerImage(image, text, state.get("logit_scale")!.data[0]).data,
        await f32File(`${dir}/reference/logits_per_image.f32`),
        { rtol: 0, atol: 1e-4, what: `${name} logits` },
      ),
    };
    // open_clip's manifest records how far its own float64 recomputation moved the float32 outputs. A float64
    // reference that computes the same function lands on the same distances, to rounding.
    const manifest = JSON.parse(await Deno.readTextFile(`${dir}/reference/manifest.json`));
    const fp64 = manifest.checks.fp32_vs_fp64_max_abs;
    for (const [key, ours] of [["image_features", errors.image], ["text_features", errors.text]] as const) {
      assert.ok(
        Math.abs(ours - fp64[key]) < 1e-10,
        `${name} ${key}: error ${ours} vs open_clip's float64 ${fp64[key]}`,
      );
    }
    assert.ok(Math.abs(errors.logits - fp64.logits_per_image) < 1e-10, `${name} logits: ${errors.logits}`);
    console.log(`${name}: reference max abs errors ${JSON.stringify(errors)} (max |image| ${maxAbs(refImage)})`);
  });
}

Deno.test("reference erf and GELU match tabulated values", () => {
  // erf values from the standard tables (Abramowitz & Stegun 7.1, extended precision).
  const table: [number, number][] = [
    [0, 0],
    [0.1, 0.1124629160182849],
    [0.5, 0.5204998778130465],
    [1, 0.8427007929497149],
    [2, 0.9953222650189527],
    [3, 0.9999779095030014],
    [-1.5, -0.9661051464753108],
  ];
  for (const [x, want] of table) assert.ok(Math.abs(erf(x) - want) < 1e-15, `erf(${x}) = ${erf(x)}, want ${want}`);
  // GELU(1) = Phi(1) = 0.8413447460685429.
  assert.ok(Math.abs(gelu(1) - 0.8413447460685429) < 1e-15);
});

Deno.test("reference CLIP loss of orthonormal matching features is log(1 + (n-1) e^-s)", () => {
  const n = 3;
  const eye = (scale: number): Matrix => ({
    rows: n,
    cols: n,
    data: Float64Array.from({ length: n * n }, (_, i) => (i % (n + 1) === 0 ? scale : 0)),
  });
  const t = Math.log(5);
  // Row scaling must not matter: features are normalised inside.
  const loss = refClipLoss(eye(2.5), eye(0.5), t);
  assert.ok(Math.abs(loss - Math.log(1 + (n - 1) * Math.exp(-5))) < 1e-15, `loss ${loss}`);
  // Swapping the first two texts leaves those rows' targets at logit 0 against one logit of 5 (in both directions).
  const swapped = eye(1);
  swapped.data.set([0, 1, 0, 1, 0, 0], 0);
  const want = (2 * Math.log(Math.exp(5) + 2) + Math.log(1 + 2 * Math.exp(-5))) / n;
  assert.ok(Math.abs(refClipLoss(eye(1), swapped, t) - want) < 1e-12);
});

Deno.test("reference AdamW: first step is lr * g / (|g| + eps), decay only where open_clip decays, clamp at ln 100", () => {
  const opt = new RefAdamW({ beta1: 0.9, beta2: 0.98, eps: 1e-6, weightDecay: 0.5, gradClip: 0 });
  const params = new Map([
    ["visual.proj", { shape: [1, 2], data: Float64Array.of(1, -2) }],
    ["visual.ln_post.weight", { shape: [2], data: Float64Array.of(1, 1) }],
    ["logit_scale", { shape: [], data: Float64Array.of(Math.log(100) - 0.001) }],
  ]);
  const lr = 0.01;
  const grads = new Map([["visual.proj", [0.5, 1e-6]], ["visual.ln_post.weight", [-2, 0]], ["logit_scale", [-3]]]);
  const info = opt.update(params, grads, lr);
  const step = (g: number) => lr * g / (Math.abs(g) + 1e-6);
  const close = (a: number, b: number) => assert.ok(Math.abs(a - b) < 1e-15, `${a} != ${b}`);
  close(params.get("visual.proj")!.data[0], 1 * (1 - lr * 0.5) - step(0.5));
  close(params.get("visual.proj")!.data[1], -2 * (1 - lr * 0.5) - step(1e-6));
  close(params.get("visual.ln_post.weight")!.data[0], 1 - step(-2));
  close(params.get("visual.ln_post.weight")!.data[1], 1);
  close(info.logitScaleUnclamped!, Math.log(100) - 0.001 - step(-3));
  close(params.get("logit_scale")!.data[0], Math.log(100));
  close(info.gradNorm, Math.sqrt(0.25 + 1e-12 + 4 + 9));
  assert.deepEqual(
    ["token_embedding.weight", "positional_embedding", "visual.class_embedding", "visual.bn1.weight", "text_projection"]
      .map((n) => refDecays(n, n === "visual.class_embedding" || n.includes("bn1") ? [4] : [4, 4])),
    [true, true, false, false, true],
  );
});
