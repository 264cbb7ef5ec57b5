import { type GradNode, persist, type Tensor } from "./tensor.ts";
import { addInto, copyOf, fullLike } from "./create.ts";

let gradEnabled = true;

/** Runs `fn` without recording the autograd graph (inference). */
export function noGrad<T>(fn: () => T): T {
  const before = gradEnabled;
  gradEnabled = false;
  try {
    return fn();
  } finally {
    gradEnabled = before;
  }
}

export function isGradEnabled(): boolean {
  return gradEnabled;
}

/** Marks a tensor as a trainable leaf: backward() accumulates into its `.grad`. */
export function requireGrad(t: Tensor): Tensor {
  t.requiresGrad = true;
  return t;
}

/** Attaches a backward rule to an op's output when any input needs a gradient. */
export function record(
  out: Tensor,
  op: string,
  inputs: readonly Tensor[],
  backward: GradNode["backward"],
): Tensor {
  if (gradEnabled && inputs.some((t) => t.requiresGrad)) {
    out.requiresGrad = true;
    out.node = { op, inputs, backward };
  }
  return out;
}

function topologicalOrder(root: Tensor): Tensor[] {
  const order: Tensor[] = [];
  const visited = new Set<Tensor>();
  const stack: [Tensor, number][] = [[root, 0]];
  visited.add(root);
  while (stack.length) {
    const top = stack[stack.length - 1];
    const [t, i] = top;
    const inputs = t.node?.inputs ?? [];
    if (i < inputs.length) {
      top[1]++;
      const next = inputs[i];
      if (next.requiresGrad && !visited.has(next)) {
        visited.add(next);
        stack.push([next, 0]);
      }
    } else {
      stack.pop();
      order.push(t);
    }
  }
  return order.reverse();
}

/**
 * Reverse-mode differentiation from `root` (a scalar unless `gradRoot` is given). Leaf gradients are accumulated into
 * `leaf.grad`, which outlives scopes, so K calls before an optimizer step sum K micro-batches' gradients. Intermediate
 * gradients are released as soon as they have been propagated.
 */
export function backward(root: Tensor, gradRoot?: Tensor): void {
  if (!root.requiresGrad) throw new Error("backward(): the tensor does not depend on any parameter that requires grad");
  if (!gradRoot && root.size !== 1) throw new Error("backward(): a non-scalar root needs an explicit gradient");
  const grads = new Map<Tensor, Tensor>();
  // How many pending entries of `grads` hold each gradient tensor: ops may pass their output gradient through.
  const holders = new Map<Tensor, number>();
  const hold = (t: Tensor, g: Tensor) => {
    grads.set(t, g);
    holders.set(g, (holders.get(g) ?? 0) + 1);
  };
  const drop = (g: Tensor) => {
    const n = (holders.get(g) ?? 0) - 1;
    if (n > 0) holders.set(g, n);
    else {
      holders.delete(g);
      if (g !== gradRoot) g.dispose();
    }
  };
  hold(root, gradRoot ?? fullLike(root, 1));
  for (const t of topologicalOrder(root)) {
    const g = grads.get(t);
    if (!g) continue;
    grads.delete(t);
    if (t.node) {
      const inputGrads = t.node.backward(g);
      t.node.inputs.forEach((input, i) => {
        const gi = inputGrads[i];
        if (!gi || !input.requiresGrad) {
          if (gi && gi !== g && !holders.has(gi)) gi.dispose();
          return;
        }
        const existing = grads.get(input);
        if (existing) {
          const sum = copyOf(existing);
          addInto(sum, gi);
          drop(existing);
          if (gi !== g && !holders.has(gi)) gi.dispose();
          hold(input, sum);
        } else hold(input, gi);
      });
    } else if (t.grad) {
      addInto(t.grad, g);
    } else {
      t.grad = persist(copyOf(g));
    }
    drop(g);
  }
}
