// Linear probe: the L-BFGS fit against an independent float64 Newton solver on a small case, and accuracy on
// separable synthetic features.
import assert from "node:assert/strict";
import {
  fitLogisticRegression,
  type LabelledFeatures,
  linearProbe,
  logisticObjective,
  probeLogits,
} from "../lib/eval/linear_probe.ts";
import { randomArray } from "./helpers.ts";

/** Solves A x = b (A n x n, row-major) by Gaussian elimination with partial pivoting. */
function solve(a: Float64Array, b: Float64Array, n: number): Float64Array {
  const m = Float64Array.from(a), x = Float64Array.from(b);
  for (let col = 0; col < n; col++) {
    let pivot = col;
    for (let r = col + 1; r < n; r++) if (Math.abs(m[r * n + col]) > Math.abs(m[pivot * n + col])) pivot = r;
    for (let k = 0; k < n; k++) [m[col * n + k], m[pivot * n + k]] = [m[pivot * n + k], m[col * n + k]];
    [x[col], x[pivot]] = [x[pivot], x[col]];
    for (let r = col + 1; r < n; r++) {
      const f = m[r * n + col] / m[col * n + col];
      for (let k = col; k < n; k++) m[r * n + k] -= f * m[col * n + k];
      x[r] -= f * x[col];
    }
  }
  for (let r = n - 1; r >= 0; r--) {
    let s = x[r];
    for (let k = r + 1; k < n; k++) s -= m[r * n + k] * x[k];
    x[r] = s / m[r * n + r];
  }
  return x;
}

/**
 * Reference optimum by Newton's method, written independently: parameters theta[c][0..dim-1] weights and
 * theta[c][dim] bias, objective mean CE + l2/2 ||W||^2, exact Hessian (with 1e-12 damping because shifting every
 * bias by the same amount changes nothing).
 */
function newtonReference(data: LabelledFeatures, dim: number, classes: number, l2: number) {
  const n = data.labels.length, d1 = dim + 1, size = classes * d1;
  const theta = new Float64Array(size);
  const augmented = (i: number) => [...Array.from({ length: dim }, (_, k) => data.features[i * dim + k]), 1];
  let loss = 0;
  for (let iter = 0; iter < 50; iter++) {
    const g = new Float64Array(size), h = new Float64Array(size * size);
    loss = 0;
    for (let i = 0; i < n; i++) {
      const x = augmented(i);
      const z = Array.from({ length: classes }, (_, c) => x.reduce((s, v, k) => s + v * theta[c * d1 + k], 0));
      const m = Math.max(...z);
      const e = z.map((v) => Math.exp(v - m));
      const total = e.reduce((a, b) => a + b, 0);
      const p = e.map((v) => v / total);
      loss += (Math.log(total) + m - z[data.labels[i]]) / n;
      for (let c = 0; c < classes; c++) {
        const r = p[c] - (c === data.labels[i] ? 1 : 0);
        for (let k = 0; k < d1; k++) g[c * d1 + k] += r * x[k] / n;
        for (let c2 = 0; c2 < classes; c2++) {
          const w = (c === c2 ? p[c] : 0) - p[c] * p[c2];
          for (let k = 0; k < d1; k++) {
            for (let k2 = 0; k2 < d1; k2++) h[(c * d1 + k) * size + c2 * d1 + k2] += w * x[k] * x[k2] / n;
          }
        }
      }
    }
    for (let c = 0; c < classes; c++) {
      for (let k = 0; k < dim; k++) {
        const j = c * d1 + k;
        loss += 0.5 * l2 * theta[j] * theta[j];
        g[j] += l2 * theta[j];
        h[j * size + j] += l2;
      }
    }
    for (let j = 0; j < size; j++) h[j * size + j] += 1e-12;
    const step = solve(h, g, size);
    for (let j = 0; j < size; j++) theta[j] -= step[j];
    if (Math.max(...g.map(Math.abs)) < 1e-14) break;
  }
  const weights = new Float64Array(classes * dim), bias = new Float64Array(classes);
  for (let c = 0; c < classes; c++) {
    for (let k = 0; k < dim; k++) weights[c * dim + k] = theta[c * d1 + k];
    bias[c] = theta[c * d1 + dim];
  }
  return { weights, bias, loss };
}

/** Gaussian clusters around random centres, rows normalised to unit length like CLIP features. */
function clusters(n: number, dim: number, classes: number, spread: number, seed: number): LabelledFeatures {
  const centres = randomArray(classes * dim, seed);
  const noise = randomArray(n * dim, seed + 1);
  const features = new Float32Array(n * dim);
  const labels = Array.from({ length: n }, (_, i) => i % classes);
  for (let i = 0; i < n; i++) {
    let norm = 0;
    for (let k = 0; k < dim; k++) {
      const v = centres[labels[i] * dim + k] + spread * noise[i * dim + k];
      features[i * dim + k] = v;
      norm += v * v;
    }
    for (let k = 0; k < dim; k++) features[i * dim + k] /= Math.sqrt(norm);
  }
  return { features, labels };
}

Deno.test("fitLogisticRegression reaches the float64 Newton optimum on a small overlapping case", () => {
  const dim = 3, classes = 3, l2 = 0.05;
  // Overlapping clusters: the optimum is finite and not trivially separable.
  const data = clusters(24, dim, classes, 1.5, 7);
  const ref = newtonReference(data, dim, classes, l2);
  const fit = fitLogisticRegression(data, dim, classes, { l2 });
  assert.ok(fit.converged, `L-BFGS did not converge in ${fit.iterations} iterations`);
  assert.ok(fit.gradientMax < 1e-7, `gradient ${fit.gradientMax} at the solution`);
  assert.ok(Math.abs(fit.loss - ref.loss) < 1e-12, `loss ${fit.loss} vs Newton ${ref.loss}`);
  for (let j = 0; j < ref.weights.length; j++) {
    assert.ok(
      Math.abs(fit.model.weights[j] - ref.weights[j]) < 1e-6,
      `weight ${j}: ${fit.model.weights[j]} vs ${ref.weights[j]}`,
    );
  }
  // The biases are defined up to a common shift (the damped Newton solve lets rounding drift along it): compare them
  // centred.
  const centred = (b: Float64Array) => b.map((v) => v - b.reduce((s, x) => s + x, 0) / b.length);
  const [mine, theirs] = [centred(fit.model.bias), centred(ref.bias)];
  for (let c = 0; c < classes; c++) {
    assert.ok(Math.abs(mine[c] - theirs[c]) < 1e-6, `bias ${c}: ${mine[c]} vs ${theirs[c]}`);
  }
});

Deno.test("logisticObjective's gradient matches central finite differences", () => {
  const dim = 4, classes = 3, l2 = 0.1;
  const data = clusters(10, dim, classes, 1, 3);
  const params = Float64Array.from(randomArray(classes * (dim + 1), 5, -0.5, 0.5));
  const { gradient } = logisticObjective(params, data, dim, classes, l2);
  const h = 1e-6;
  for (let j = 0; j < params.length; j++) {
    const plus = Float64Array.from(params), minus = Float64Array.from(params);
    plus[j] += h;
    minus[j] -= h;
    const numeric = (logisticObjective(plus, data, dim, classes, l2).loss -
      logisticObjective(minus, data, dim, classes, l2).loss) / (2 * h);
    assert.ok(Math.abs(numeric - gradient[j]) < 1e-8, `d/dparam ${j}: ${gradient[j]} vs ${numeric}`);
  }
});

Deno.test("linearProbe reaches 100% on separable synthetic features and reports CLIP_benchmark's metrics", () => {
  const dim = 16, classes = 5;
  const train = clusters(250, dim, classes, 0.1, 21);
  // The test set shares the centres (same seed for them) with fresh noise.
  const testNoise = clusters(100, dim, classes, 0.1, 21);
  const fresh = randomArray(100 * dim, 99);
  const test: LabelledFeatures = {
    features: Float32Array.from(testNoise.features, (v, i) => v + 0.01 * fresh[i]),
    labels: testNoise.labels,
  };
  const result = linearProbe(train, test, dim, classes);
  assert.equal(result.metrics.acc1, 1);
  assert.equal(result.metrics.acc5, 1);
  assert.equal(result.metrics.mean_per_class_recall, 1);
  assert.equal(result.validation.length, 6);
  const best = Math.max(...result.validation.map((v) => v.acc1));
  assert.equal(result.validation.find((v) => v.acc1 === best)!.l2, result.l2, "the first best strength is chosen");
  // The refit is on all training data: it classifies every training sample too.
  const z = probeLogits(result.model, train.features);
  for (let i = 0; i < 250; i++) {
    const row = Array.from(z.subarray(i * classes, (i + 1) * classes));
    assert.equal(row.indexOf(Math.max(...row)), train.labels[i]);
  }
});

Deno.test("linearProbe picks the strength that generalises on noisy data, deterministically", () => {
  const dim = 24, classes = 4;
  // Few samples, many dimensions, heavy noise: weak regularisation overfits.
  const train = clusters(60, dim, classes, 2.5, 40);
  const test = clusters(400, dim, classes, 2.5, 40);
  const a = linearProbe(train, test, dim, classes, { seed: 3 });
  const b = linearProbe(train, test, dim, classes, { seed: 3 });
  assert.deepEqual(a.validation, b.validation);
  assert.equal(a.l2, b.l2);
  const accs = a.validation.map((v) => v.acc1);
  assert.equal(a.validation.find((v) => v.acc1 === Math.max(...accs))!.l2, a.l2);
  assert.ok(a.metrics.acc1 > 1 / classes + 0.1, `test accuracy ${a.metrics.acc1} should beat chance (0.25) clearly`);
});

Deno.test("linearProbe refuses labels outside the classes", () => {
  const data = { features: [1, 0, 0, 1], labels: [0, 2] };
  assert.throws(() => linearProbe(data, data, 2, 2), RangeError);
});
