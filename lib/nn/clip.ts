import type { Gpu } from "../gpu/runtime.ts";
import { exp, l2Normalize, matmul, mul } from "../tensor/ops.ts";
import { fromArray } from "../tensor/create.ts";
import { readsKNFaster } from "../tensor/ops/matmul.ts";
import type { Tensor } from "../tensor/tensor.ts";
import type { UnaryOp } from "../../kernels/elementwise.ts";
import { type ClipConfig, expectedShapes, isResNetVision } from "./config.ts";
import { initParameters } from "./init.ts";
import { isLinearWeight } from "./layers.ts";
import { expectShape, type HostTensor, Params } from "./params.ts";
import { encodeImageResNet } from "./resnet.ts";
import { encodeTextTower, eotPositions } from "./text.ts";
import { encodeImageViT } from "./vit.ts";

/** Token ids on the GPU with the EOT position of each row. */
export interface TextInput {
  ids: Tensor;
  eot: Tensor;
}

/** A CLIP model: its config (as data) and its parameters by open_clip name. */
export class ClipModel {
  constructor(readonly config: ClipConfig, readonly params: Params) {
    for (const [name, shape] of expectedShapes(config)) expectShape(name, params.get(name), shape);
  }

  /** A freshly initialised model (open_clip's initialisation), deterministic in `seed`. */
  static init(gpu: Gpu, config: ClipConfig, seed = 0): ClipModel {
    return new ClipModel(config, Params.upload(gpu, initParameters(config, seed)));
  }

  static fromStateDict(gpu: Gpu, config: ClipConfig, state: Map<string, HostTensor>): ClipModel {
    return new ClipModel(config, Params.upload(gpu, state));
  }

  /**
   * Readies a model that only embeds, classifies or evaluates for the adapter's fastest products: holds the Linear
   * weights transposed where products read [K, N] weights faster (`readsKNFaster`), and leaves them as stored
   * elsewhere.
   */
  forInference(): this {
    return readsKNFaster(this.params.gpu.adapter) ? this.transposeLinearWeights() : this;
  }

  /**
   * Holds the Linear weights as [in, out] (`Params.transposeForInference`): the transposed weights take no gradients,
   * and checkpoints written afterwards still hold open_clip's layout.
   */
  transposeLinearWeights(): this {
    this.params.transposeForInference([...this.params.tensors.keys()].filter(isLinearWeight));
    return this;
  }

  get activation(): UnaryOp {
    return this.config.quick_gelu ? "quick_gelu" : "gelu";
  }

  get contextLength(): number {
    return this.config.text_cfg.context_length;
  }

  /** Image features before normalisation: [B, 3, S, S] -> [B, embed_dim]. */
  encodeImage(images: Tensor, training = false): Tensor {
    const v = this.config.vision_cfg;
    return isResNetVision(v)
      ? encodeImageResNet(this.params, v, images, training)
      : encodeImageViT(this.params, v, this.activation, images);
  }

  /**
   * Uploads token ids i32 [B, ctx] and their EOT positions. Separate from encoding because an upload submits what was
   * recorded before it: a step uploads all its inputs first and then records its work as one submission.
   */
  uploadTokens(tokens: Int32Array): TextInput {
    const ctx = this.contextLength;
    const gpu = this.params.gpu;
    const rows = tokens.length / ctx;
    if (!Number.isInteger(rows)) {
      throw new Error(`token array of ${tokens.length} ids is not a multiple of context ${ctx}`);
    }
    return { ids: fromArray(gpu, tokens, [rows, ctx]), eot: fromArray(gpu, eotPositions(tokens, ctx), [rows]) };
  }

  /** Text features before normalisation: [B, embed_dim]. */
  encodeText(text: TextInput): Tensor {
    return encodeTextTower(this.params, this.config.text_cfg, this.activation, text.ids, text.eot);
  }

  /** exp(logit_scale) as a 0-d tensor. */
  logitScaleExp(): Tensor {
    return exp(this.params.get("logit_scale"));
  }

  /** Normalised features and logits_per_image = exp(t) * I T^T. */
  forward(images: Tensor, text: TextInput, training = false) {
    const imageFeatures = l2Normalize(this.encodeImage(images, training));
    const textFeatures = l2Normalize(this.encodeText(text));
    const logitScale = this.logitScaleExp();
    const logitsPerImage = mul(matmul(imageFeatures, textFeatures, { transB: true }), logitScale);
    return { imageFeatures, textFeatures, logitScale, logitsPerImage };
  }
}
