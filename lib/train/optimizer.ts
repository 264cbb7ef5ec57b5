import {
  adamwKernel,
  adamwUniforms,
  adamwWorkgroups,
  clipCoefficientKernel,
  sumSquaresKernel,
  sumSquaresPartials,
  sumSquaresWorkgroups,
} from "../../kernels/optimizer.ts";
import type { Gpu } from "../gpu/runtime.ts";
import { foldWorkgroups } from "../gpu/runtime.ts";
import { fromArray, zeros } from "../tensor/create.ts";
import { persist, type Tensor } from "../tensor/tensor.ts";
import type { HostTensor } from "../nn/params.ts";

export interface AdamWConfig {
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
  /** Global gradient-norm clip; 0 disables it. */
  gradClip: number;
}

export const OPEN_CLIP_ADAMW: AdamWConfig = { beta1: 0.9, beta2: 0.98, eps: 1e-6, weightDecay: 0.2, gradClip: 0 };

/**
 * open_clip's weight-decay rule: no decay for gains, biases, 1-D parameters (class embedding included) and the logit
 * scale; matrices, convolutions and embedding tables decay.
 */
export function decays(name: string, shape: readonly number[]): boolean {
  return !(shape.length < 2 || /(^|\.)(bn|ln)/.test(name) || name.includes("bias") || name.includes("logit_scale"));
}

/** The logit scale is clamped to [0, ln 100] after every step, as open_clip does. */
const CLAMPED: Record<string, [number, number]> = { logit_scale: [0, Math.log(100)] };

interface Slot {
  name: string;
  param: Tensor;
  m: Tensor;
  v: Tensor;
  decay: boolean;
}

/**
 * AdamW over named parameters. `step` only records GPU work: the gradient norm, the clip coefficient and every
 * update run in the same submission as the backward pass.
 */
export class AdamW {
  private slots: Slot[];
  private partial: Tensor;
  /** [clip coefficient, gradient norm] of the last step. */
  readonly clipState: Tensor;
  step = 0;

  constructor(private gpu: Gpu, params: [string, Tensor][], readonly config: AdamWConfig) {
    this.slots = params.map(([name, param]) => ({
      name,
      param,
      m: persist(zeros(gpu, param.shape)),
      v: persist(zeros(gpu, param.shape)),
      decay: decays(name, param.shape),
    }));
    const partials = this.slots.reduce((n, s) => n + sumSquaresPartials(s.param.size), 0);
    this.partial = persist(zeros(gpu, [Math.max(1, partials)]));
    this.clipState = persist(fromArray(gpu, Float32Array.of(1, 0), [2]));
  }

  /** Records one update with learning rate `lr` from the accumulated `.grad`s, then clears them. */
  update(lr: number): void {
    this.step++;
    const { beta1, beta2, eps, weightDecay } = this.config;
    const withGrad = this.slots.filter((s) => s.param.grad);
    let partials = 0;
    for (const s of withGrad) {
      this.gpu.dispatch(
        sumSquaresKernel(),
        [s.param.grad!.buffer, this.partial.buffer],
        foldWorkgroups(sumSquaresWorkgroups(s.param.size)),
        Uint32Array.of(s.param.size, partials),
      );
      partials += sumSquaresPartials(s.param.size);
    }
    const clipUniform = new ArrayBuffer(8);
    new Uint32Array(clipUniform, 0, 1)[0] = partials;
    new Float32Array(clipUniform, 4, 1)[0] = this.config.gradClip;
    this.gpu.dispatch(
      clipCoefficientKernel(),
      [this.partial.buffer, this.clipState.buffer],
      1,
      new Uint8Array(clipUniform),
    );
    for (const s of withGrad) {
      const uniforms = adamwUniforms({
        n: s.param.size,
        lr,
        weightDecay: s.decay ? weightDecay : 0,
        beta1,
        beta2,
        eps,
        biasCorrection1: 1 - beta1 ** this.step,
        biasCorrection2: 1 - beta2 ** this.step,
        clampMin: CLAMPED[s.name]?.[0] ?? -Infinity,
        clampMax: CLAMPED[s.name]?.[1] ?? Infinity,
      });
      this.gpu.dispatch(
        adamwKernel(),
        [s.param.buffer, s.param.grad!.buffer, s.m.buffer, s.v.buffer, this.clipState.buffer],
        foldWorkgroups(adamwWorkgroups(s.param.size)),
        new Uint8Array(uniforms),
      );
    }
    this.zeroGrad();
  }

  zeroGrad(): void {
    for (const s of this.slots) {
      s.param.grad?.dispose();
      s.param.grad = null;
    }
  }

  /** Moments by parameter name (`<name>.exp_avg`, `<name>.exp_avg_sq`), for checkpoints. */
  async state(): Promise<Map<string, HostTensor>> {
    const tensors = this.slots.flatMap((s) => [[`${s.name}.exp_avg`, s.m], [`${s.name}.exp_avg_sq`, s.v]] as const);
    const datas = await this.gpu.readMany(tensors.map(([, t]) => ({ buffer: t.buffer, bytes: t.byteLength })));
    return new Map(tensors.map(([n, t], i) => [n, { shape: [...t.shape], data: new Float32Array(datas[i]) }]));
  }

  loadState(state: Map<string, HostTensor>, step: number): void {
    for (const s of this.slots) {
      for (const [suffix, t] of [["exp_avg", s.m], ["exp_avg_sq", s.v]] as const) {
        const h = state.get(`${s.name}.${suffix}`);
        if (!h || h.data.length !== t.size) {
          throw new Error(`optimizer state for '${s.name}.${suffix}' is missing or mis-sized`);
        }
        this.gpu.write(t.buffer, h.data);
      }
    }
    this.step = step;
  }
}
