// One training step of a tiny CLIP against float64: every parameter's gradient against finite differences of the
// reference loss, AdamW's update against PyTorch's rule (decay groups, clipping, the logit-scale clamp), and
// gradient accumulation over micro-batches against one large batch.
import assert from "node:assert/strict";
import { assertClose, gpu } from "./helpers.ts";
import { lossAndGradients } from "./step_helpers.ts";
import { withScope } from "../lib/tensor/tensor.ts";
import {
  perturbedParameters,
  randomImages,
  randomTokens,
  RefAdamW,
  refDecays,
  RefLossDifferences,
  refModelLoss,
  toFloat64State,
} from "./reference_clip.ts";
import type { Batch } from "../lib/data/loader.ts";
import { ClipModel } from "../lib/nn/clip.ts";
import { type ClipConfig, parseClipConfig } from "../lib/nn/config.ts";
import { initParameters } from "../lib/nn/init.ts";
import type { HostTensor } from "../lib/nn/params.ts";
import { AdamW, type AdamWConfig, OPEN_CLIP_ADAMW } from "../lib/train/optimizer.ts";
import { recordStep } from "../lib/train/step.ts";

/** 2,129 trainable parameters: small enough to difference every one of them in float64. Exact GELU. */
const TINY: ClipConfig = parseClipConfig({
  embed_dim: 8,
  quick_gelu: false,
  vision_cfg: { image_size: 8, layers: 1, width: 8, patch_size: 4, head_width: 4, mlp_ratio: 2 },
  text_cfg: { context_length: 8, vocab_size: 32, width: 8, heads: 2, layers: 1, mlp_ratio: 2 },
}, "tiny ViT");

const BATCH = 4;

function tinyState(seed: number): Map<string, HostTensor> {
  return perturbedParameters(initParameters(TINY, seed), seed + 1);
}

function maxAbs(values: Iterable<ArrayLike<number>>): number {
  let m = 0;
  for (const v of values) for (let i = 0; i < v.length; i++) m = Math.max(m, Math.abs(v[i]));
  return m;
}

Deno.test("the loss and every parameter gradient of one step on a tiny model equal a float64 reference", async () => {
  const state = tinyState(300);
  const images = randomImages(BATCH, TINY.vision_cfg.image_size, 302);
  const tokens = randomTokens(BATCH, TINY.text_cfg, 303);
  const model = ClipModel.fromStateDict(await gpu(), TINY, state);
  let result;
  try {
    result = await lossAndGradients(model, images, tokens);
  } finally {
    model.params.dispose();
  }
  const fd = new RefLossDifferences(state, TINY, images, tokens, { step: 1e-5 });
  const lossError = assertClose([result.loss], [fd.loss()], { rtol: 1e-5, atol: 0, what: "loss" });
  const expected = new Map(
    [...result.grads].map((
      [name, g],
    ) => [name, Float64Array.from({ length: g.length }, (_, i) => fd.derivative(name, i))]),
  );
  const total = [...expected.values()].reduce((n, g) => n + g.length, 0);
  assert.equal(total, 2129);
  // Each entry within 1e-4 relative plus 5e-5 of its tensor's largest gradient: the float32 sums behind an entry
  // round relative to the magnitudes summed, not to the (possibly cancelling) result. Measured: at most 5e-6 of the
  // tensor's largest gradient.
  let worst = 0;
  let worstOfScale = 0;
  for (const [name, want] of expected) {
    const scale = maxAbs([want]);
    const error = assertClose(result.grads.get(name)!, want, {
      rtol: 1e-4,
      atol: 5e-5 * scale,
      what: `gradient of ${name}`,
    });
    worst = Math.max(worst, error);
    if (scale > 0) worstOfScale = Math.max(worstOfScale, error / scale);
  }
  console.log(
    `${total} parameters, ${expected.size} tensors: loss error ${lossError.toExponential(2)}, max gradient error ${
      worst.toExponential(2)
    } (max |gradient| ${maxAbs(expected.values()).toExponential(2)}; at most ${
      worstOfScale.toExponential(2)
    } of a tensor's largest gradient)`,
  );
});

Deno.test("AdamW updates equal PyTorch's rule in float64: decay groups, gradient clipping, logit-scale clamp", async () => {
  const state = tinyState(400);
  // Above the clamp by 5 steps of lr (as a loaded checkpoint may be): whichever way the gradient points, step 1 clamps.
  state.get("logit_scale")!.data[0] = Math.log(100) + 0.05;
  const images = randomImages(BATCH, TINY.vision_cfg.image_size, 402);
  const tokens = randomTokens(BATCH, TINY.text_cfg, 403);
  const g = await gpu();
  const model = ClipModel.fromStateDict(g, TINY, state);
  // One config object drives both optimizers, so changing the clip norm between steps changes it for both.
  const config: AdamWConfig = { beta1: 0.9, beta2: 0.98, eps: 1e-6, weightDecay: 0.5, gradClip: 0 };
  const optimizer = new AdamW(g, model.params.trainable(), config);
  const reference = new RefAdamW(config);
  const expected = toFloat64State(new Map(model.params.trainable().map(([name]) => [name, state.get(name)!])));
  const lr = 0.01;
  try {
    for (let step = 1; step <= 2; step++) {
      const { grads } = await lossAndGradients(model, images, tokens);
      if (step === 2) {
        // Clip to half the norm, so the second step's gradient enters the moments at half weight.
        let squares = 0;
        for (const gr of grads.values()) for (const v of gr) squares += v * v;
        config.gradClip = Math.sqrt(squares) / 2;
      }
      optimizer.update(lr);
      const info = reference.update(expected, grads, lr);
      const [params, clipState] = await Promise.all([model.params.download(), optimizer.clipState.read()]);
      let error = 0;
      for (const [name, want] of expected) {
        error = Math.max(
          error,
          assertClose(params.get(name)!.data, want.data, { rtol: 1e-6, atol: 1e-6, what: `step ${step}: ${name}` }),
        );
      }
      console.log(
        `step ${step}: max parameter error ${error.toExponential(2)}, clip coefficient ${info.clipCoefficient}`,
      );
      assertClose(clipState, [info.clipCoefficient, info.gradNorm], { rtol: 1e-5, atol: 0, what: "clip state" });
      if (step === 1) {
        assert.ok(info.logitScaleUnclamped! > Math.log(100) + 1e-3, "step 1 must exercise the logit-scale clamp");
        assert.equal(params.get("logit_scale")!.data[0], Math.fround(Math.log(100)));
      } else assert.ok(Math.abs(info.clipCoefficient - 0.5) < 1e-3, "step 2 must exercise gradient clipping");
    }
    // Both decay groups are present and decay moves each by far more than the tolerance, so a parameter put in the
    // wrong group would fail above.
    for (const decaying of [true, false]) {
      const effect = Math.max(
        ...[...expected].filter(([n, t]) => refDecays(n, t.shape) === decaying).map(([, t]) =>
          lr * config.weightDecay * maxAbs([t.data])
        ),
      );
      assert.ok(effect > 1e-4, `decay of the ${decaying ? "" : "non-"}decaying group is only ${effect}`);
    }
  } finally {
    model.params.dispose();
  }
});

function batchOf(images: Float32Array, tokens: Int32Array, size: number): Batch {
  return {
    images,
    tokens,
    size,
    keys: [],
    captions: [],
    labels: new Int32Array(size).fill(-1),
    shards: [],
    position: { readers: [], next: 0 },
  };
}

Deno.test("gradient accumulation: two micro-batches give the update of one batch twice as large", async () => {
  const state = tinyState(500);
  const images = randomImages(2 * BATCH, TINY.vision_cfg.image_size, 502);
  const tokens = randomTokens(2 * BATCH, TINY.text_cfg, 503);
  const pixels = images.length / 2;
  const ctx = TINY.text_cfg.context_length;
  const g = await gpu();
  const run = async (batches: Batch[]) => {
    const model = ClipModel.fromStateDict(g, TINY, state);
    const optimizer = new AdamW(g, model.params.trainable(), OPEN_CLIP_ADAMW);
    try {
      return await withScope(async () => {
        const loss = recordStep(model, optimizer, batches, 1e-3);
        const [lossValue, params, moments] = await Promise.all([
          loss.read(),
          model.params.download(),
          optimizer.state(),
        ]);
        return { loss: lossValue[0], params, moments };
      });
    } finally {
      model.params.dispose();
    }
  };
  const whole = await run([batchOf(images, tokens, 2 * BATCH)]);
  const halves = await run([
    batchOf(images.slice(0, pixels), tokens.slice(0, BATCH * ctx), BATCH),
    batchOf(images.slice(pixels), tokens.slice(BATCH * ctx), BATCH),
  ]);
  const refLoss = refModelLoss(state, TINY, images, tokens);
  assertClose([whole.loss, halves.loss], [refLoss, refLoss], { rtol: 1e-5, atol: 0, what: "losses" });
  // The first moment after one step is (1 - beta1) * gradient: the accumulated gradients themselves.
  const momentScale = maxAbs([...whole.moments.values()].map((m) => m.data));
  let momentError = 0;
  let paramError = 0;
  for (const [name, m] of whole.moments) {
    momentError = Math.max(
      momentError,
      assertClose(halves.moments.get(name)!.data, m.data, {
        rtol: 1e-4,
        atol: 1e-5 * momentScale,
        what: `moment ${name}`,
      }),
    );
  }
  for (const [name, p] of whole.params) {
    paramError = Math.max(
      paramError,
      assertClose(halves.params.get(name)!.data, p.data, { rtol: 0, atol: 1e-5, what: name }),
    );
  }
  // The step moved every tensor, so agreement is not the trivial "nothing changed".
  const unmoved = [...whole.params].filter(([name, p]) => p.data.every((v, i) => v === state.get(name)!.data[i]));
  assert.deepEqual(unmoved.map(([name]) => name), []);
  console.log(
    `loss ${whole.loss} vs ${halves.loss} (float64 ${refLoss}); max moment difference ${
      momentError.toExponential(2)
    }, ` +
      `max parameter difference ${paramError.toExponential(2)}`,
  );
});
