import type { Batch } from "../data/loader.ts";
import type { ClipModel } from "../nn/clip.ts";
import { backward, noGrad } from "../tensor/autograd.ts";
import { fromArray } from "../tensor/create.ts";
import { concat, l2Normalize } from "../tensor/ops.ts";
import type { Tensor } from "../tensor/tensor.ts";
import { clipLoss, diagonalLabels } from "./loss.ts";
import type { AdamW } from "./optimizer.ts";

interface Uploaded {
  images: Tensor;
  text: ReturnType<ClipModel["uploadTokens"]>;
}

function upload(model: ClipModel, b: Batch): Uploaded {
  const s = model.config.vision_cfg.image_size;
  return { images: fromArray(model.params.gpu, b.images, [b.size, 3, s, s]), text: model.uploadTokens(b.tokens) };
}

/**
 * Records one optimisation step over K micro-batches (K = batches.length) and returns the loss tensor; nothing is
 * submitted until the caller reads. With K > 1 this is open_clip's accumulation: features of every micro-batch are
 * first computed without gradients, then each micro-batch is re-encoded with gradients and its loss taken against
 * all K batches' features, so the summed gradient equals that of one batch K times larger. The logit scale enters
 * with gradients only once, so that its gradient is not counted K times.
 */
export function recordStep(model: ClipModel, optimizer: AdamW, batches: Batch[], lr: number): Tensor {
  const inputs = batches.map((b) => upload(model, b));
  const total = batches.reduce((n, b) => n + b.size, 0);
  const labels = diagonalLabels(model.params.get("logit_scale"), total);
  let loss: Tensor;
  if (inputs.length === 1) {
    const [x] = inputs;
    const image = l2Normalize(model.encodeImage(x.images, true));
    const text = l2Normalize(model.encodeText(x.text));
    loss = clipLoss(image, text, model.logitScaleExp(), labels);
    backward(loss);
  } else {
    const cached = noGrad(() =>
      inputs.map((x) => ({
        image: l2Normalize(model.encodeImage(x.images, false)),
        text: l2Normalize(model.encodeText(x.text)),
      }))
    );
    const detachedScale = noGrad(() => model.logitScaleExp());
    loss = cached[0].image; // replaced below; keeps the type non-null
    inputs.forEach((x, j) => {
      const image = l2Normalize(model.encodeImage(x.images, true));
      const text = l2Normalize(model.encodeText(x.text));
      const images = concat(cached.map((c, i) => i === j ? image : c.image), 0);
      const texts = concat(cached.map((c, i) => i === j ? text : c.text), 0);
      const microLoss = clipLoss(images, texts, j === 0 ? model.logitScaleExp() : detachedScale, labels);
      backward(microLoss);
      if (j === 0) loss = microLoss;
    });
  }
  optimizer.update(lr);
  return loss;
}
