// AdamW's vec4 kernels against a float64 AdamW: tensors whose sizes are not multiples of 4 (the last word reaches into
// the buffer's padding, which must keep its bits), a tensor spread over several partial sums of squares, the
// gradient-norm clip and the logit-scale clamp.
import assert from "node:assert/strict";
import { assertClose, gpu, randomArray } from "./helpers.ts";
import { fromArray } from "../lib/tensor/create.ts";
import { persist, type Tensor } from "../lib/tensor/tensor.ts";
import { AdamW, type AdamWConfig, decays } from "../lib/train/optimizer.ts";

interface RefSlot {
  name: string;
  shape: number[];
  p: Float64Array;
  m: Float64Array;
  v: Float64Array;
}

/** One float64 AdamW step (PyTorch's rule, open_clip's decay groups and clamp); returns [coefficient, norm]. */
function refStep(slots: RefSlot[], grads: Float64Array[], cfg: AdamWConfig, lr: number, step: number): number[] {
  const norm = Math.sqrt(grads.reduce((s, g) => s + g.reduce((a, v) => a + v * v, 0), 0));
  const coef = cfg.gradClip > 0 ? Math.min(1, cfg.gradClip / (norm + 1e-6)) : 1;
  const bc1 = 1 - cfg.beta1 ** step, bc2 = 1 - cfg.beta2 ** step;
  slots.forEach((s, k) => {
    const wd = decays(s.name, s.shape) ? cfg.weightDecay : 0;
    for (let i = 0; i < s.p.length; i++) {
      const g = grads[k][i] * coef;
      s.m[i] = cfg.beta1 * s.m[i] + (1 - cfg.beta1) * g;
      s.v[i] = cfg.beta2 * s.v[i] + (1 - cfg.beta2) * g * g;
      let p = s.p[i] * (1 - lr * wd) - (lr / bc1) * s.m[i] / (Math.sqrt(s.v[i]) / Math.sqrt(bc2) + cfg.eps);
      if (s.name === "logit_scale") p = Math.min(Math.max(p, 0), Math.log(100));
      s.p[i] = p;
    }
  });
  return [coef, norm];
}

Deno.test("AdamW on vec4 words: odd sizes, several partial sums of squares, clipping and clamping match float64", async () => {
  const g = await gpu();
  // 1517 elements: two runs of partial sums and a last word with one element; [3] and [1]: one partial word each.
  const specs: [string, number[], number][] = [["proj.weight", [37, 41], 0.5], ["proj.bias", [3], 0.5], [
    "logit_scale",
    [1],
    Math.log(100) - 1e-4,
  ]];
  const params = new Map<string, Tensor>();
  const ref: RefSlot[] = specs.map(([name, shape, scale], k) => {
    const values = Float32Array.from(randomArray(shape.reduce((a, d) => a * d, 1), 401 + k, -scale, scale));
    if (name === "logit_scale") values[0] = scale;
    params.set(name, persist(fromArray(g, values, shape)));
    const p = Float64Array.from(values);
    return { name, shape, p, m: new Float64Array(p.length), v: new Float64Array(p.length) };
  });
  const config: AdamWConfig = { beta1: 0.9, beta2: 0.98, eps: 1e-6, weightDecay: 0.2, gradClip: 0 };
  const optimizer = new AdamW(g, [...params], config);
  const weight = params.get("proj.weight")!;
  const paddingBytes = { buffer: weight.buffer, offset: weight.byteLength, bytes: 16 - (weight.byteLength % 16) };
  // Values an update would change, in the padding after the weight's last element.
  g.write(weight.buffer, new Float32Array(paddingBytes.bytes / 4).fill(7), paddingBytes.offset);
  const [paddingBefore] = await g.readMany([paddingBytes]);
  try {
    for (let step = 1; step <= 2; step++) {
      const grads = ref.map((s, k) =>
        Float64Array.from(Float32Array.from(randomArray(s.p.length, 410 + 10 * step + k)))
      );
      // Step 2 clips to a third of the gradient norm; the logit scale's gradient points down, so step 1 clamps it.
      if (step === 1) grads[2][0] = -1;
      if (step === 2) {
        config.gradClip = Math.sqrt(grads.reduce((s, gr) => s + gr.reduce((a, v) => a + v * v, 0), 0)) / 3;
      }
      ref.forEach((s, k) => {
        params.get(s.name)!.grad = persist(fromArray(g, Float32Array.from(grads[k]), s.shape));
      });
      optimizer.update(0.01);
      const expectedClip = refStep(ref, grads, config, 0.01, step);
      const state = await optimizer.state();
      for (const s of ref) {
        const got = await params.get(s.name)!.read();
        assertClose(got, s.p, { rtol: 1e-6, atol: 1e-6, what: `step ${step}: ${s.name}` });
        assertClose(state.get(`${s.name}.exp_avg`)!.data, s.m, { rtol: 1e-5, atol: 1e-8, what: `${s.name} m` });
        assertClose(state.get(`${s.name}.exp_avg_sq`)!.data, s.v, { rtol: 1e-5, atol: 1e-10, what: `${s.name} v` });
      }
      assertClose(await optimizer.clipState.read(), expectedClip, { rtol: 1e-5, atol: 0, what: "clip state" });
      if (step === 1) assert.equal((await params.get("logit_scale")!.read())[0], Math.fround(Math.log(100)));
      else assert.ok(Math.abs(expectedClip[0] - 1 / 3) < 1e-3, "step 2 must clip");
    }
    const [paddingAfter] = await g.readMany([paddingBytes]);
    assert.deepEqual(new Uint8Array(paddingAfter), new Uint8Array(paddingBefore), "padding bits changed");
  } finally {
    for (const t of params.values()) t.dispose();
  }
});
