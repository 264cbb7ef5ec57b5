// Gradients of the CLIP loss through whole micro models on the GPU (ViT and modified-ResNet image towers, text tower,
// normalisation, logit scale, symmetric cross-entropy) against central finite differences of the float64 reference.
import assert from "node:assert/strict";
import { assertClose, gpu } from "./helpers.ts";
import { type LossAndGradients, lossAndGradients } from "./step_helpers.ts";
import {
  perturbedParameters,
  randomImages,
  randomTokens,
  type RefImageOptions,
  RefLossDifferences,
} from "./reference_clip.ts";
import { Rng } from "../lib/data/rng.ts";
import { ClipModel } from "../lib/nn/clip.ts";
import { type ClipConfig, parseClipConfig } from "../lib/nn/config.ts";
import { initParameters } from "../lib/nn/init.ts";

const TEXT = { context_length: 8, vocab_size: 64, width: 16, heads: 2, layers: 2, mlp_ratio: 2 };

/** Two blocks per tower so gradients cross a block boundary; QuickGELU, as OpenAI's weights use. */
const MICRO_VIT: ClipConfig = parseClipConfig({
  embed_dim: 8,
  quick_gelu: true,
  vision_cfg: { image_size: 16, layers: 2, width: 16, patch_size: 8, head_width: 8, mlp_ratio: 2 },
  text_cfg: TEXT,
}, "micro ViT");

/** Every ResNet stage once; 32 px leaves 1x1 at the attention pool. Exact GELU in the text tower. */
const MICRO_RESNET: ClipConfig = parseClipConfig({
  embed_dim: 8,
  quick_gelu: false,
  vision_cfg: { image_size: 32, layers: [1, 1, 1, 1], width: 8, patch_size: null, head_width: 64 },
  text_cfg: { ...TEXT, layers: 1 },
}, "micro ResNet");

interface Entry {
  name: string;
  index: number;
}

/** `perTensor` seeded entries of every named tensor, plus `extra` more in the tensors listed in `emphasis`. */
function sampleEntries(
  shapes: Map<string, number>,
  perTensor: number,
  emphasis: string[],
  extra: number,
  seed: number,
): Entry[] {
  const rng = new Rng(seed);
  const out: Entry[] = [];
  for (const [name, size] of shapes) {
    const count = Math.min(size, perTensor + (emphasis.includes(name) ? extra : 0));
    const picked = new Set<number>();
    while (picked.size < count) picked.add(Math.floor(rng.next() * size));
    for (const index of picked) out.push({ name, index });
  }
  return out;
}

/** `count` seeded entries of token-embedding rows that the tokens use (the others have no gradient). */
function usedTokenEntries(tokens: Int32Array, width: number, count: number, seed: number): Entry[] {
  const rng = new Rng(seed);
  const used = [...new Set(tokens)].filter((id) => id !== 0);
  return Array.from({ length: count }, () => ({
    name: "token_embedding.weight",
    index: used[Math.floor(rng.next() * used.length)] * width + Math.floor(rng.next() * width),
  }));
}

async function checkGradients(
  cfg: ClipConfig,
  opts: {
    training: boolean;
    batch: number;
    seed: number;
    step: number;
    entries: (sizes: Map<string, number>, tokens: Int32Array) => Entry[];
  },
  tolerance: { lossRtol: number; rtol: number; atolOfMax: number },
): Promise<void> {
  const state = perturbedParameters(initParameters(cfg, opts.seed), opts.seed + 1);
  const images = randomImages(opts.batch, cfg.vision_cfg.image_size, opts.seed + 2);
  const tokens = randomTokens(opts.batch, cfg.text_cfg, opts.seed + 3);
  const model = ClipModel.fromStateDict(await gpu(), cfg, state);
  let result: LossAndGradients;
  try {
    result = await lossAndGradients(model, images, tokens, opts.training);
  } finally {
    model.params.dispose();
  }
  const refOpts: RefImageOptions & { step: number } = { batchNormTraining: opts.training, step: opts.step };
  const fd = new RefLossDifferences(state, cfg, images, tokens, refOpts);
  const lossError = assertClose([result.loss], [fd.loss()], { rtol: tolerance.lossRtol, atol: 0, what: "loss" });
  const entries = opts.entries(new Map([...result.grads].map(([n, g]) => [n, g.length])), tokens);
  const actual = entries.map((e) => result.grads.get(e.name)![e.index]);
  const expected = entries.map((e) => fd.derivative(e.name, e.index));
  const scale = Math.max(...expected.map(Math.abs));
  const atol = tolerance.atolOfMax * scale;
  const failures: string[] = [];
  let maxError = 0;
  let worst = { name: "", ratio: 0 };
  entries.forEach((e, i) => {
    const error = Math.abs(actual[i] - expected[i]);
    const ratio = error / (atol + tolerance.rtol * Math.abs(expected[i]));
    maxError = Math.max(maxError, error);
    if (ratio > worst.ratio) worst = { name: `${e.name}[${e.index}]`, ratio };
    if (!(ratio <= 1)) failures.push(`${e.name}[${e.index}] is ${actual[i]}, expected ${expected[i]}`);
  });
  assert.ok(
    failures.length === 0,
    `gradients off (tolerance ${atol} + ${tolerance.rtol}*|expected|): ${failures.join("; ")}`,
  );
  console.log(
    `${entries.length} entries: loss error ${lossError.toExponential(2)}, max gradient error ${
      maxError.toExponential(2)
    } (max |gradient| ${scale.toExponential(2)}; worst ${worst.name} at ${
      (worst.ratio * 100).toFixed(1)
    }% of tolerance)`,
  );
}

Deno.test("micro ViT CLIP: GPU loss gradients match float64 finite differences on a sample of every tensor", async () => {
  await checkGradients(MICRO_VIT, {
    training: true,
    batch: 4,
    seed: 100,
    step: 1e-5,
    entries: (sizes, tokens) => [
      ...usedTokenEntries(tokens, MICRO_VIT.text_cfg.width, 6, 8),
      ...sampleEntries(
        sizes,
        1,
        [
          "logit_scale",
          "visual.class_embedding",
          "visual.positional_embedding",
          "positional_embedding",
          "visual.transformer.resblocks.0.attn.in_proj_weight",
          "transformer.resblocks.1.attn.in_proj_weight",
          "token_embedding.weight",
          "visual.ln_pre.weight",
          "ln_final.weight",
          "visual.proj",
          "text_projection",
        ],
        3,
        7,
      ),
    ],
  }, { lossRtol: 1e-5, rtol: 1e-4, atolOfMax: 1e-5 });
});

/**
 * Batch statistics over 3 images make the micro ResNet ill-conditioned (layer4 normalises 3 values per channel): in
 * the float64 reference, relative noise of 6e-8 on the image-tower parameters (float32 rounding) moves the loss by
 * about 5e-6 with batch statistics against 3e-8 with running statistics. The tolerances follow.
 */
const TRAINING_BN_TOLERANCE: Record<string, { lossRtol: number; rtol: number; atolOfMax: number }> = {
  false: { lossRtol: 1e-5, rtol: 1e-4, atolOfMax: 1e-5 },
  true: { lossRtol: 1e-4, rtol: 1e-3, atolOfMax: 1e-4 },
};

for (const training of [false, true]) {
  Deno.test(
    `micro ResNet CLIP (batch norm ${
      training ? "with batch statistics" : "in eval mode"
    }): GPU gradients match float64 finite differences`,
    async () => {
      await checkGradients(MICRO_RESNET, {
        training,
        batch: 3,
        seed: 200,
        // ReLU kinks: a small step keeps the differences from straddling one.
        step: 1e-6,
        entries: (sizes) =>
          sampleEntries(
            new Map([...sizes].filter(([n]) => n.startsWith("visual.") || n === "logit_scale")),
            1,
            [],
            0,
            9,
          ),
      }, TRAINING_BN_TOLERANCE[String(training)]);
    },
  );
}
