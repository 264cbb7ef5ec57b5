import { matmulKernel, type MatmulSpec, matmulWorkgroups } from "../../../kernels/matmul.ts";
import { elementGroups, unaryBackwardKernel, type UnaryOp } from "../../../kernels/elementwise.ts";
import { isGradEnabled, record } from "../autograd.ts";
import { empty, emptyLike } from "../create.ts";
import { shapeString, type Tensor } from "../tensor.ts";
import { sumAxesForward } from "./elementwise.ts";

export interface MatmulOptions {
  /** Use A's last two axes transposed (A stored as [..., K, M]). */
  transA?: boolean;
  /** Use B's last two axes transposed (B stored as [..., N, K], as a PyTorch Linear weight is). */
  transB?: boolean;
  /** Added to every row: [N]. */
  bias?: Tensor;
  /** Applied after the bias. */
  activation?: UnaryOp | null;
  /** Added after the activation: C's shape. */
  residual?: Tensor;
}

// Activations whose derivative is written in terms of the input alone, so a fused residual cannot spoil it.
const INPUT_DERIVATIVE: ReadonlySet<UnaryOp> = new Set(["gelu", "quick_gelu", "relu", "neg", "square", "log"]);

interface Geometry {
  batchShape: number[];
  batch: number;
  m: number;
  n: number;
  k: number;
  aBatchStride: number;
  bBatchStride: number;
}

function geometry(a: Tensor, b: Tensor, transA: boolean, transB: boolean): Geometry {
  if (a.rank < 2 || b.rank < 2) throw new Error(`matmul needs rank >= 2 operands, got ${a} and ${b}`);
  const [ar, ac] = a.shape.slice(-2);
  const [br, bc] = b.shape.slice(-2);
  const [m, ka] = transA ? [ac, ar] : [ar, ac];
  const [kb, n] = transB ? [bc, br] : [br, bc];
  if (ka !== kb) {
    throw new Error(
      `matmul: inner sizes differ: ${shapeString(a.shape)}${transA ? "^T" : ""} x ${shapeString(b.shape)}${
        transB ? "^T" : ""
      }`,
    );
  }
  const aBatch = a.shape.slice(0, -2);
  const bBatch = b.shape.slice(0, -2);
  const aCount = aBatch.reduce((p, d) => p * d, 1);
  const bCount = bBatch.reduce((p, d) => p * d, 1);
  if (aCount > 1 && bCount > 1 && shapeString(aBatch) !== shapeString(bBatch)) {
    throw new Error(`matmul: batch shapes ${shapeString(aBatch)} and ${shapeString(bBatch)} differ`);
  }
  const batchShape = aCount >= bCount ? aBatch : bBatch;
  return {
    batchShape,
    batch: Math.max(aCount, bCount),
    m,
    n,
    k: ka,
    aBatchStride: aCount > 1 ? m * ka : 0,
    bBatchStride: bCount > 1 ? ka * n : 0,
  };
}

/** Records one matmul dispatch without autograd; returns the output and, if asked, the pre-activation values. */
export function matmulForward(
  a: Tensor,
  b: Tensor,
  opts: MatmulOptions = {},
  savePreActivation = false,
): { out: Tensor; pre: Tensor | null } {
  const transA = opts.transA ?? false;
  const transB = opts.transB ?? false;
  const g = geometry(a, b, transA, transB);
  const outShape = [...g.batchShape, g.m, g.n];
  if (opts.bias && (opts.bias.size !== g.n)) throw new Error(`matmul: bias ${opts.bias} does not match N=${g.n}`);
  if (opts.residual && opts.residual.size !== g.batch * g.m * g.n) {
    throw new Error(`matmul: residual ${opts.residual} does not match the output ${shapeString(outShape)}`);
  }
  const spec: MatmulSpec = {
    batch: g.batch,
    m: g.m,
    n: g.n,
    k: g.k,
    transA,
    transB,
    aBatchStride: g.aBatchStride,
    bBatchStride: g.bBatchStride,
    bias: !!opts.bias,
    activation: opts.activation ?? null,
    savePreActivation: savePreActivation && !!opts.activation,
    residual: !!opts.residual,
  };
  const out = empty(a.gpu, outShape);
  const pre = spec.savePreActivation ? empty(a.gpu, outShape) : null;
  const bindings = [a.buffer, b.buffer, out.buffer];
  if (opts.bias) bindings.push(opts.bias.buffer);
  if (opts.residual) bindings.push(opts.residual.buffer);
  if (pre) bindings.push(pre.buffer);
  if (g.k === 0) throw new Error("matmul with K = 0 is not supported");
  a.gpu.dispatch(matmulKernel(spec), bindings, matmulWorkgroups(spec));
  return { out, pre };
}

/** Sums a batched gradient over its leading batch axes when the operand was shared by the whole batch. */
function reduceBatch(grad: Tensor, operand: Tensor): Tensor {
  if (grad.size === operand.size) {
    const v = grad.view(operand.shape);
    grad.dispose();
    return v;
  }
  const lead = grad.rank - 2;
  const reduced = grad.shape.map((_, d) => d < lead);
  const summed = sumAxesForward(grad, reduced);
  grad.dispose();
  const v = summed.view(operand.shape);
  summed.dispose();
  return v;
}

/**
 * C = act(op(A) op(B) + bias) + residual, batched over leading axes (one operand may have none: it is shared).
 * Backward: dA = dZ op(B)^T, dB = op(A)^T dZ (summed over the batch when shared), dbias = column sums of dZ.
 */
export function matmul(a: Tensor, b: Tensor, opts: MatmulOptions = {}): Tensor {
  const act = opts.activation ?? null;
  const needGrad = isGradEnabled() && [a, b, opts.bias, opts.residual].some((t) => t?.requiresGrad);
  if (needGrad && act && opts.residual && !INPUT_DERIVATIVE.has(act)) {
    throw new Error(`matmul: a fused residual cannot be combined with '${act}' when gradients are needed`);
  }
  const { out, pre } = matmulForward(a, b, opts, needGrad);
  const transA = opts.transA ?? false;
  const transB = opts.transB ?? false;
  const inputs = [a, b, ...(opts.bias ? [opts.bias] : []), ...(opts.residual ? [opts.residual] : [])];
  return record(out, "matmul", inputs, (g) => {
    let dz = g;
    if (act && pre) {
      dz = emptyLike(g);
      g.gpu.dispatch(
        unaryBackwardKernel(act, g.size),
        [pre.buffer, out.buffer, g.buffer, dz.buffer],
        elementGroups(g.size),
      );
    }
    let da: Tensor | null = null;
    let db: Tensor | null = null;
    if (a.requiresGrad) {
      const r = transA
        ? matmulForward(b, dz, { transA: transB, transB: true }).out // stored [K,M] = op(B) dZ^T
        : matmulForward(dz, b, { transB: !transB }).out; // [M,K] = dZ op(B)^T
      da = reduceBatch(r, a);
    }
    if (b.requiresGrad) {
      const r = transB
        ? matmulForward(dz, a, { transA: true, transB: transA }).out // stored [N,K] = dZ^T op(A)
        : matmulForward(a, dz, { transA: !transA }).out; // [K,N] = op(A)^T dZ
      db = reduceBatch(r, b);
    }
    const grads: (Tensor | null)[] = [da, db];
    if (opts.bias) {
      grads.push(
        opts.bias.requiresGrad
          ? sumAxesForward(dz, dz.shape.map((_, d) => d < dz.rank - 1)).view(opts.bias.shape)
          : null,
      );
    }
    if (opts.residual) grads.push(opts.residual.requiresGrad ? (dz === g ? g : viewOf(g)) : null);
    if (dz !== g) dz.dispose();
    pre?.dispose();
    return grads;
  });
}

function viewOf(t: Tensor): Tensor {
  return t.view(t.shape);
}
