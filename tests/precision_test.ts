// f16 precision: the cast kernel against IEEE half rounding, matmuls with f16 operands (both kernel paths) against
// float64 products of the rounded operands, the straight-through gradients of `withPrecision("f16")`, and a whole
// training step of a tiny CLIP at f16 against the float64 reference. Adapters without shader-f16 (the GL back end)
// must refuse f16 by name instead.
import assert from "node:assert/strict";
import { assertClose, gpu, param, randomArray, refMatmul } from "./helpers.ts";
import { lossAndGradients } from "./step_helpers.ts";
import { perturbedParameters, randomImages, randomTokens, RefLossDifferences } from "./reference_clip.ts";
import { UsageError } from "../lib/errors.ts";
import { ClipModel } from "../lib/nn/clip.ts";
import { parseClipConfig } from "../lib/nn/config.ts";
import { initParameters } from "../lib/nn/init.ts";
import { backward } from "../lib/tensor/autograd.ts";
import { fromArray } from "../lib/tensor/create.ts";
import { cast } from "../lib/tensor/ops/cast.ts";
import { mul, sum } from "../lib/tensor/ops/elementwise.ts";
import { matmul, matmulForward, planMatmul, setMatmulPath } from "../lib/tensor/ops/matmul.ts";
import { assertPrecisionSupported, withPrecision } from "../lib/tensor/precision.ts";
import { Scope, withScope } from "../lib/tensor/tensor.ts";

const hasF16 = (await gpu()).hasF16;

/** Values rounded to IEEE half precision (round to nearest even), as float64. */
function half(values: ArrayLike<number>): Float64Array {
  return Float64Array.from(Float16Array.from(values));
}

if (!hasF16) {
  Deno.test("f16: an adapter without shader-f16 refuses it with a message naming the fix", async () => {
    const g = await gpu();
    assert.throws(() => assertPrecisionSupported(g, "f16"), (e: Error) => {
      assert.ok(e instanceof UsageError);
      assert.match(e.message, /shader-f16/);
      assert.match(e.message, /--precision f32/);
      return true;
    });
    assertPrecisionSupported(g, "f32");
    const scope = new Scope();
    try {
      assert.throws(() => cast(fromArray(g, [1, 2], [2]), "f16"), /shader-f16/);
    } finally {
      scope.end();
    }
  });
} else {
  Deno.test("f16: cast rounds to nearest even and widens exactly", async () => {
    const g = await gpu();
    await withScope(async () => {
      // Normal f16 range, values between representable halves, and an odd count (the scalar kernel).
      for (const n of [4096, 1001]) {
        const values = Float32Array.from(randomArray(n, 5, -3000, 3000), (v, i) => i % 3 === 0 ? v / 1024 : v);
        const halves = cast(fromArray(g, values, [n]), "f16");
        assert.equal(halves.dtype, "f16");
        const expected = half(values);
        assertClose(await halves.read(), expected, { rtol: 0, atol: 0, what: `f16 of ${n} values` });
        assertClose(await cast(halves, "f32").read(), expected, { rtol: 0, atol: 0, what: "widened back" });
      }
    });
  });

  Deno.test("f16: matmul with f16 operands equals the float64 product of the rounded operands, both paths", async () => {
    const g = await gpu();
    const [m, n, k] = [70, 45, 37];
    for (const path of ["buffer", "texture"] as const) {
      const previous = setMatmulPath(path);
      try {
        await withScope(async () => {
          for (const transA of [false, true]) {
            for (const transB of [false, true]) {
              const a = param(g, transA ? [k, m] : [m, k], 21, -2, 2, false);
              const b = param(g, transB ? [n, k] : [k, n], 22, -2, 2, false);
              const a16 = cast(a.t, "f16");
              assert.equal(planMatmul(a16, b.t, { transA, transB }).path, path);
              // Mixed operands (the backward pass multiplies f32 gradients by f16 saved operands) and both f16.
              const mixed = matmulForward(a16, b.t, { transA, transB }).out;
              const both = matmulForward(a16, cast(b.t, "f16"), { transA, transB }).out;
              const what = `${path} ${transA ? "A^T" : "A"} x ${transB ? "B^T" : "B"}`;
              assertClose(await mixed.read(), refMatmul(half(a.v), b.v, m, n, k, transA, transB), {
                rtol: 1e-5,
                atol: 1e-5,
                what: `${what}, f16 A`,
              });
              assertClose(await both.read(), refMatmul(half(a.v), half(b.v), m, n, k, transA, transB), {
                rtol: 1e-5,
                atol: 1e-5,
                what: `${what}, f16 A and B`,
              });
            }
          }
        });
      } finally {
        setMatmulPath(previous);
      }
    }
  });

  Deno.test("f16: under withPrecision('f16') matmul rounds its operands and passes f32 gradients through", async () => {
    const g = await gpu();
    const [m, n, k] = [33, 20, 50];
    await withScope(async () => {
      const a = param(g, [m, k], 31);
      const b = param(g, [n, k], 32);
      const bias = param(g, [n], 33);
      const up = param(g, [m, n], 34, -1, 1, false);
      const out = withPrecision("f16", () => matmul(a.t, b.t, { transB: true, bias: bias.t }));
      assert.equal(out.dtype, "f32");
      backward(sum(mul(out, up.t)));
      const product = refMatmul(half(a.v), half(b.v), m, n, k, false, true);
      assertClose(await out.read(), product.map((v, i) => v + bias.v[i % n]), { rtol: 1e-5, what: "output" });
      // d(sum(up * (A B^T + bias)))/dA = up round(B), /dB = up^T round(A): gradients are never rounded.
      assertClose(await a.t.grad!.read(), refMatmul(up.v, half(b.v), m, k, n), { rtol: 1e-5, what: "dA" });
      assertClose(await b.t.grad!.read(), refMatmul(up.v, half(a.v), n, k, m, true), { rtol: 1e-5, what: "dB" });
      const columnSums = new Float64Array(n).map((_, j) => {
        let s = 0;
        for (let i = 0; i < m; i++) s += up.v[i * n + j];
        return s;
      });
      assertClose(await bias.t.grad!.read(), columnSums, { rtol: 1e-5, what: "dbias" });
    });
  });

  Deno.test("f16: one training step of a tiny CLIP stays within f16 rounding of the float64 reference", async () => {
    const config = parseClipConfig({
      embed_dim: 8,
      quick_gelu: false,
      vision_cfg: { image_size: 8, layers: 1, width: 8, patch_size: 4, head_width: 4, mlp_ratio: 2 },
      text_cfg: { context_length: 8, vocab_size: 32, width: 8, heads: 2, layers: 1, mlp_ratio: 2 },
    }, "tiny ViT");
    const state = perturbedParameters(initParameters(config, 500), 501);
    const images = randomImages(4, 8, 502);
    const tokens = randomTokens(4, config.text_cfg, 503);
    const model = ClipModel.fromStateDict(await gpu(), config, state);
    let half16, full32;
    try {
      half16 = await withPrecision("f16", () => lossAndGradients(model, images, tokens));
      for (const t of model.params.trainable().map(([, t]) => t)) t.grad?.dispose(), t.grad = null;
      full32 = await lossAndGradients(model, images, tokens);
    } finally {
      model.params.dispose();
    }
    const reference = new RefLossDifferences(state, config, images, tokens, { step: 1e-5 });
    const want = reference.loss();
    // Each product's operands carry a relative error up to 2^-11; through a few layers the loss moves by well under
    // 1%. f32 is 100x closer, which shows the f16 path was taken.
    const lossError16 = Math.abs(half16.loss - want) / Math.abs(want);
    const lossError32 = Math.abs(full32.loss - want) / Math.abs(want);
    assert.ok(lossError16 < 5e-3, `f16 loss ${half16.loss} vs reference ${want}`);
    assert.ok(lossError16 > 10 * lossError32, `f16 loss error ${lossError16} is not above f32's ${lossError32}`);
    let worst = 0;
    for (const [name, grad] of half16.grads) {
      const expected = Float64Array.from({ length: grad.length }, (_, i) => reference.derivative(name, i));
      const scale = expected.reduce((s, v) => Math.max(s, Math.abs(v)), 0);
      const error = assertClose(grad, expected, { rtol: 2e-2, atol: 2e-2 * scale, what: `f16 gradient of ${name}` });
      if (scale > 0) worst = Math.max(worst, error / scale);
    }
    console.log(
      `f16 step: loss relative error ${lossError16.toExponential(2)} (f32 ${lossError32.toExponential(2)}), ` +
        `gradients within ${worst.toExponential(2)} of each tensor's largest`,
    );
  });
}
