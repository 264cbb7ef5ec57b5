// Parity with open_clip's PyTorch code on the reference fixtures: same weights and inputs, same features and logits.
import assert from "node:assert/strict";
import { assertClose, f32File, gpu, i32File } from "./helpers.ts";
import { loadStateDict, resolveCheckpoint } from "../lib/io/checkpoint_layout.ts";
import { ClipModel } from "../lib/nn/clip.ts";
import { readsKNFaster } from "../lib/tensor/ops/matmul.ts";
import { noGrad } from "../lib/tensor/autograd.ts";
import { fromArray } from "../lib/tensor/create.ts";
import { l2Normalize } from "../lib/tensor/ops.ts";
import { withScope } from "../lib/tensor/tensor.ts";

const ROOT = new URL("./fixtures/models/", import.meta.url).pathname;

const maxAbs = (x: Float32Array) => x.reduce((m, v) => Math.max(m, Math.abs(v)), 0);

// Each model also runs with its Linear weights held transposed, as `ClipModel.forInference` holds them where products
// read [K, N] weights faster.
for (
  const [name, inference] of ["vit_tiny", "vit_tiny_hf", "rn_tiny"].flatMap((n) => [[n, false], [n, true]] as const)
) {
  const label = `${name}${inference ? " (inference layout)" : ""}`;
  Deno.test(`${label}: image and text features and logits match open_clip`, async () => {
    const g = await gpu();
    const dir = `${ROOT}${name}`;
    const resolved = await resolveCheckpoint(dir);
    const model = ClipModel.fromStateDict(g, resolved.config, await loadStateDict(resolved));
    if (inference) model.transposeLinearWeights();
    const ref = `${dir}/reference`;
    const images = await f32File(`${ref}/input_images.f32`);
    const tokens = await i32File(`${ref}/input_tokens.i32`);
    const size = resolved.config.vision_cfg.image_size;
    try {
      await withScope(async () => {
        const out = noGrad(() => {
          const x = fromArray(g, images, [images.length / (3 * size * size), 3, size, size]);
          const text = model.uploadTokens(tokens);
          const imageRaw = model.encodeImage(x);
          const textRaw = model.encodeText(text);
          const { logitsPerImage, logitScale } = model.forward(x, text);
          return {
            imageRaw,
            textRaw,
            imageNorm: l2Normalize(imageRaw),
            textNorm: l2Normalize(textRaw),
            logitsPerImage,
            logitScale,
          };
        });
        const refImage = await f32File(`${ref}/image_features.f32`);
        const refText = await f32File(`${ref}/text_features.f32`);
        const errors = {
          image: assertClose(await out.imageRaw.read(), refImage, {
            rtol: 0,
            atol: 1e-4 * Math.max(1, maxAbs(refImage)),
            what: "image features",
          }),
          text: assertClose(await out.textRaw.read(), refText, {
            rtol: 0,
            atol: 1e-4 * Math.max(1, maxAbs(refText)),
            what: "text features",
          }),
          imageNorm: assertClose(await out.imageNorm.read(), await f32File(`${ref}/image_features_norm.f32`), {
            rtol: 0,
            atol: 1e-4,
            what: "normalised image features",
          }),
          textNorm: assertClose(await out.textNorm.read(), await f32File(`${ref}/text_features_norm.f32`), {
            rtol: 0,
            atol: 1e-4,
            what: "normalised text features",
          }),
          logits: assertClose(await out.logitsPerImage.read(), await f32File(`${ref}/logits_per_image.f32`), {
            rtol: 0,
            atol: 1e-3,
            what: "logits",
          }),
          scale: assertClose(await out.logitScale.read(), await f32File(`${ref}/logit_scale_exp.f32`), {
            rtol: 1e-6,
            atol: 0,
            what: "exp(logit_scale)",
          }),
        };
        console.log(`${label} max abs errors: ${JSON.stringify(errors)}`);
      });
    } finally {
      model.params.dispose();
    }
  });
}

Deno.test("inference layout: the Linear weights are held transposed, and downloads still give open_clip's layout", async () => {
  const g = await gpu();
  const resolved = await resolveCheckpoint(`${ROOT}vit_tiny`);
  const state = await loadStateDict(resolved);
  const name = "visual.transformer.resblocks.0.mlp.c_fc.weight";
  const asStored = ClipModel.fromStateDict(g, resolved.config, state).forInference();
  assert.equal(asStored.params.isTransposed(name), readsKNFaster(g.adapter), "forInference follows the adapter");
  asStored.params.dispose();
  const model = ClipModel.fromStateDict(g, resolved.config, state).transposeLinearWeights();
  try {
    assert.ok(model.params.isTransposed(name));
    assert.deepEqual(model.params.get(name).shape, [...state.get(name)!.shape].reverse());
    assert.ok(!model.params.isTransposed("visual.proj"), "only Linear weights change layout");
    const downloaded = await model.params.download();
    assert.equal(downloaded.size, state.size);
    for (const [n, h] of state) {
      assert.deepEqual(downloaded.get(n)!.shape, h.shape, n);
      assert.deepEqual(downloaded.get(n)!.data, h.data, n);
    }
  } finally {
    model.params.dispose();
  }
});
