/**
 * Linear probe: multinomial logistic regression on frozen features, fitted in float64 on the CPU.
 *
 * The objective is the mean cross-entropy plus (l2 / 2) ||W||^2 (the bias is not penalised), minimised with L-BFGS
 * and a backtracking (Armijo) line search. It is strictly convex in W for l2 > 0, so the fit is the unique optimum
 * up to the tolerance, whatever the start. The strength is chosen from a small grid by top-1 accuracy on a held-out
 * 20% of the training features (a seeded shuffle), then the probe is refitted on all of them: the protocol of CLIP's
 * linear-probe evaluation, with a fixed grid instead of its parametric search. Accuracy is reported with CLIP_benchmark's
 * names (acc1, acc5, mean_per_class_recall).
 *
 * Cost per objective evaluation is n * dim * classes multiply-adds; this is meant for probes of up to some tens of
 * thousands of features.
 */
import { Rng } from "../data/rng.ts";
import { type ClassificationMetrics, classificationMetrics } from "./metrics.ts";

/** Features [n, dim] row-major with their labels in 0..classes-1. */
export interface LabelledFeatures {
  features: ArrayLike<number>;
  labels: ArrayLike<number>;
}

export interface LogisticModel {
  dim: number;
  numClasses: number;
  /** [classes, dim]. */
  weights: Float64Array;
  /** [classes]. */
  bias: Float64Array;
}

export interface FitOptions {
  /** L2 strength on the weights. */
  l2: number;
  /** Default 1000. */
  maxIterations?: number;
  /** Stop when the largest gradient component is below this. Default 1e-7. */
  tolerance?: number;
  /** Start from these parameters (warm start) instead of zeros. */
  init?: LogisticModel;
}

export interface FitResult {
  model: LogisticModel;
  loss: number;
  /** Largest absolute gradient component at the solution. */
  gradientMax: number;
  iterations: number;
  converged: boolean;
}

/** The parameter vector is [W (classes x dim), b (classes)]. */
function parameterCount(dim: number, numClasses: number): number {
  return numClasses * (dim + 1);
}

function checkData(data: LabelledFeatures, dim: number, numClasses: number): number {
  const n = data.labels.length;
  if (data.features.length !== n * dim) {
    throw new RangeError(`linear probe: ${data.features.length} feature values for ${n} samples of dimension ${dim}`);
  }
  for (let i = 0; i < n; i++) {
    const y = data.labels[i];
    if (!Number.isInteger(y) || y < 0 || y >= numClasses) {
      throw new RangeError(`linear probe: sample ${i} has label ${y}, outside 0..${numClasses - 1}`);
    }
  }
  return n;
}

/** One array type for every feature access keeps the hot loops monomorphic (a mix of array types is 2-3x slower). */
function asFloat32(values: ArrayLike<number>): Float32Array {
  return values instanceof Float32Array ? values : Float32Array.from(values);
}

/** Logits z = W x + b for every row: [n, classes]. */
function logitsOf(params: Float64Array, features: Float32Array, n: number, dim: number, numClasses: number) {
  const z = new Float64Array(n * numClasses);
  const biasAt = numClasses * dim;
  for (let i = 0; i < n; i++) {
    const row = i * dim;
    for (let c = 0; c < numClasses; c++) {
      let s = params[biasAt + c];
      const w = c * dim;
      for (let k = 0; k < dim; k++) s += params[w + k] * features[row + k];
      z[i * numClasses + c] = s;
    }
  }
  return z;
}

/**
 * The objective and its gradient at `params`: mean cross-entropy + (l2 / 2) ||W||^2. Exported for tests, which
 * check the optimum's gradient and compare with an independent solver.
 */
export function logisticObjective(
  params: Float64Array,
  data: LabelledFeatures,
  dim: number,
  numClasses: number,
  l2: number,
): { loss: number; gradient: Float64Array } {
  const n = data.labels.length;
  const features = asFloat32(data.features);
  const z = logitsOf(params, features, n, dim, numClasses);
  const gradient = new Float64Array(params.length);
  const biasAt = numClasses * dim;
  let loss = 0;
  for (let i = 0; i < n; i++) {
    const zi = z.subarray(i * numClasses, (i + 1) * numClasses);
    let max = -Infinity;
    for (let c = 0; c < numClasses; c++) max = Math.max(max, zi[c]);
    let sum = 0;
    for (let c = 0; c < numClasses; c++) sum += Math.exp(zi[c] - max);
    const logSum = max + Math.log(sum);
    const y = data.labels[i];
    loss += logSum - zi[y];
    // d loss_i / d z_ic = softmax_c - [c = y], averaged over samples.
    for (let c = 0; c < numClasses; c++) {
      const d = (Math.exp(zi[c] - logSum) - (c === y ? 1 : 0)) / n;
      if (d === 0) continue;
      gradient[biasAt + c] += d;
      const w = c * dim, row = i * dim;
      for (let k = 0; k < dim; k++) gradient[w + k] += d * features[row + k];
    }
  }
  loss /= Math.max(1, n);
  let penalty = 0;
  for (let j = 0; j < biasAt; j++) {
    penalty += params[j] * params[j];
    gradient[j] += l2 * params[j];
  }
  return { loss: loss + 0.5 * l2 * penalty, gradient };
}

function dot(a: Float64Array, b: Float64Array): number {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i] * b[i];
  return s;
}

function maxAbs(a: Float64Array): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]));
  return m;
}

/** L-BFGS history length. */
const MEMORY = 10;

/** Fits the probe for one regularisation strength with L-BFGS. */
export function fitLogisticRegression(
  data: LabelledFeatures,
  dim: number,
  numClasses: number,
  opts: FitOptions,
): FitResult {
  checkData(data, dim, numClasses);
  data = { features: asFloat32(data.features), labels: Int32Array.from(data.labels) };
  if (!(opts.l2 >= 0)) throw new RangeError(`linear probe: l2 must be >= 0, got ${opts.l2}`);
  const maxIterations = opts.maxIterations ?? 1000;
  const tolerance = opts.tolerance ?? 1e-7;
  const size = parameterCount(dim, numClasses);
  const x = new Float64Array(size);
  if (opts.init) {
    x.set(opts.init.weights, 0);
    x.set(opts.init.bias, numClasses * dim);
  }
  const evaluate = (p: Float64Array) => logisticObjective(p, data, dim, numClasses, opts.l2);
  let { loss, gradient } = evaluate(x);
  const history: { s: Float64Array; y: Float64Array; rho: number }[] = [];
  let iterations = 0;
  let converged = maxAbs(gradient) < tolerance;
  while (!converged && iterations < maxIterations) {
    iterations++;
    // Two-loop recursion: direction = -H g with H the L-BFGS inverse-Hessian estimate.
    const q = Float64Array.from(gradient);
    const alphas: number[] = [];
    for (let h = history.length - 1; h >= 0; h--) {
      const { s, y, rho } = history[h];
      const a = rho * dot(s, q);
      alphas[h] = a;
      for (let i = 0; i < size; i++) q[i] -= a * y[i];
    }
    const last = history[history.length - 1];
    const gamma = last ? dot(last.s, last.y) / dot(last.y, last.y) : 1 / Math.max(1, maxAbs(gradient));
    for (let i = 0; i < size; i++) q[i] *= gamma;
    for (let h = 0; h < history.length; h++) {
      const { s, y, rho } = history[h];
      const b = rho * dot(y, q);
      for (let i = 0; i < size; i++) q[i] += s[i] * (alphas[h] - b);
    }
    const direction = q.map((v) => -v);
    let slope = dot(gradient, direction);
    if (!(slope < 0)) {
      // Not a descent direction (numerical trouble): restart from steepest descent.
      history.length = 0;
      for (let i = 0; i < size; i++) direction[i] = -gradient[i] / Math.max(1, maxAbs(gradient));
      slope = dot(gradient, direction);
    }
    // Backtracking until the Armijo condition holds.
    let step = 1;
    let next: Float64Array, trial: { loss: number; gradient: Float64Array };
    for (let tries = 0;; tries++) {
      next = x.map((v, i) => v + step * direction[i]);
      trial = evaluate(next);
      if (trial.loss <= loss + 1e-4 * step * slope || tries >= 40) break;
      step *= 0.5;
    }
    const s = next.map((v, i) => v - x[i]);
    const y = trial.gradient.map((v, i) => v - gradient[i]);
    const sy = dot(s, y);
    const improvement = loss - trial.loss;
    x.set(next);
    loss = trial.loss;
    gradient = trial.gradient;
    if (sy > 1e-12 * Math.sqrt(dot(s, s) * dot(y, y))) {
      history.push({ s, y, rho: 1 / sy });
      if (history.length > MEMORY) history.shift();
    }
    converged = maxAbs(gradient) < tolerance ||
      // Progress below the rounding noise of the objective: as close as float64 can tell.
      (improvement >= 0 && improvement <= 1e-15 * Math.max(1, Math.abs(loss)) && maxAbs(s) < 1e-12);
  }
  return {
    model: {
      dim,
      numClasses,
      weights: x.slice(0, numClasses * dim),
      bias: x.slice(numClasses * dim),
    },
    loss,
    gradientMax: maxAbs(gradient),
    iterations,
    converged,
  };
}

/** Logits [n, classes] of the probe for features [n, dim]. */
export function probeLogits(model: LogisticModel, features: ArrayLike<number>): Float64Array {
  const n = features.length / model.dim;
  const params = new Float64Array(parameterCount(model.dim, model.numClasses));
  params.set(model.weights, 0);
  params.set(model.bias, model.numClasses * model.dim);
  return logitsOf(params, asFloat32(features), n, model.dim, model.numClasses);
}

/** Default grid of L2 strengths, from strong to weak (warm starts then follow the regularisation path). */
export const DEFAULT_L2_GRID: readonly number[] = [1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6];

export interface LinearProbeOptions {
  l2Grid?: readonly number[];
  /** Share of the training features held out to choose the strength. Default 0.2. */
  validationFraction?: number;
  /** Seed of the train/validation split. Default 0. */
  seed?: number;
  maxIterations?: number;
}

export interface LinearProbeResult {
  metrics: ClassificationMetrics;
  /** The strength chosen. */
  l2: number;
  /** Held-out top-1 accuracy of each strength tried. */
  validation: { l2: number; acc1: number }[];
  model: LogisticModel;
}

function subset(data: LabelledFeatures, rows: number[], dim: number): LabelledFeatures {
  const features = new Float32Array(rows.length * dim);
  rows.forEach((r, i) => {
    for (let k = 0; k < dim; k++) features[i * dim + k] = data.features[r * dim + k];
  });
  return { features, labels: rows.map((r) => data.labels[r]) };
}

function top1(model: LogisticModel, data: LabelledFeatures): number {
  const z = probeLogits(model, data.features);
  const c = model.numClasses;
  let hits = 0;
  for (let i = 0; i < data.labels.length; i++) {
    let best = 0;
    for (let k = 1; k < c; k++) if (z[i * c + k] > z[i * c + best]) best = k;
    if (best === data.labels[i]) hits++;
  }
  return hits / Math.max(1, data.labels.length);
}

/**
 * Chooses the L2 strength on a held-out split of `train`, refits on all of `train`, and scores `test`.
 * With a single strength in the grid (or too few samples to hold any out) it just fits and scores.
 */
export function linearProbe(
  train: LabelledFeatures,
  test: LabelledFeatures,
  dim: number,
  numClasses: number,
  opts: LinearProbeOptions = {},
): LinearProbeResult {
  const n = checkData(train, dim, numClasses);
  checkData(test, dim, numClasses);
  if (n === 0) throw new RangeError("linear probe: no training samples");
  const grid = opts.l2Grid ?? DEFAULT_L2_GRID;
  if (grid.length === 0) throw new RangeError("linear probe: empty L2 grid");
  const maxIterations = opts.maxIterations;
  const holdOut = Math.floor(n * (opts.validationFraction ?? 0.2));
  const validation: { l2: number; acc1: number }[] = [];
  let chosen = grid[0];
  let warm: LogisticModel | undefined;
  if (grid.length > 1 && holdOut >= 1 && holdOut < n) {
    const order = new Rng(opts.seed ?? 0).shuffle(Array.from({ length: n }, (_, i) => i));
    const fitPart = subset(train, order.slice(holdOut), dim);
    const heldOut = subset(train, order.slice(0, holdOut), dim);
    let best = -1;
    let init: LogisticModel | undefined;
    for (const l2 of grid) {
      const fit = fitLogisticRegression(fitPart, dim, numClasses, { l2, init, maxIterations });
      init = fit.model;
      const acc1 = top1(fit.model, heldOut);
      validation.push({ l2, acc1 });
      // Strictly better only: among equals the first (strongest) regularisation wins.
      if (acc1 > best) {
        best = acc1;
        chosen = l2;
        warm = fit.model;
      }
    }
  }
  const final = fitLogisticRegression(train, dim, numClasses, { l2: chosen, init: warm, maxIterations });
  const logits = probeLogits(final.model, test.features);
  return {
    metrics: classificationMetrics(logits, numClasses, test.labels),
    l2: chosen,
    validation,
    model: final.model,
  };
}
