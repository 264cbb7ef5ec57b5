// The loss and gradients of one batch, recorded as a training step records them (lib/train/step.ts), for tests that
// compare them with the float64 reference.
import assert from "node:assert/strict";
import type { ClipModel } from "../lib/nn/clip.ts";
import { backward } from "../lib/tensor/autograd.ts";
import { fromArray } from "../lib/tensor/create.ts";
import { l2Normalize } from "../lib/tensor/ops.ts";
import { withScope } from "../lib/tensor/tensor.ts";
import { clipLoss, diagonalLabels } from "../lib/train/loss.ts";

export interface LossAndGradients {
  loss: number;
  grads: Map<string, Float32Array>;
}

/** Reads the loss and every parameter's gradient; the gradients stay on the parameters for an optimizer to use. */
export async function lossAndGradients(
  model: ClipModel,
  images: Float32Array,
  tokens: Int32Array,
  training = true,
): Promise<LossAndGradients> {
  const g = model.params.gpu;
  const size = model.config.vision_cfg.image_size;
  const batch = tokens.length / model.contextLength;
  return await withScope(async () => {
    const x = fromArray(g, images, [batch, 3, size, size]);
    const text = model.uploadTokens(tokens);
    const labels = diagonalLabels(model.params.get("logit_scale"), batch);
    const image = l2Normalize(model.encodeImage(x, training));
    const loss = clipLoss(image, l2Normalize(model.encodeText(text)), model.logitScaleExp(), labels);
    backward(loss);
    const trainable = model.params.trainable();
    for (const [name, t] of trainable) assert.ok(t.grad, `no gradient reached '${name}'`);
    const data = await g.readMany(
      [loss, ...trainable.map(([, t]) => t.grad!)].map((t) => ({ buffer: t.buffer, bytes: t.byteLength })),
    );
    return {
      loss: new Float32Array(data[0])[0],
      grads: new Map(trainable.map(([name], i) => [name, new Float32Array(data[i + 1])])),
    };
  });
}
