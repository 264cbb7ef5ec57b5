// Every public tensor op in one import. Each family lives in ops/<family>.ts (forward, backward rule) with its WGSL
// generators in kernels/<family>.ts; raw `*Forward` helpers and kernel plumbing stay in their modules.
export { copyOf, empty, fromArray, full, zeros } from "./create.ts";
export { add, div, exp, gelu, mean, mul, quickGelu, relu, reshape, scale, sub, sum, unary } from "./ops/elementwise.ts";
export { matmul, type MatmulOptions } from "./ops/matmul.ts";
export { l2Normalize, layerNorm } from "./ops/norm.ts";
export { softmax, type SoftmaxOptions } from "./ops/softmax.ts";
export { attention, type AttentionOptions } from "./ops/attention.ts";
export { crossEntropy } from "./ops/loss.ts";
export { concat, permute, slice, transpose } from "./ops/layout.ts";
export { embedding, gatherRows } from "./ops/gather.ts";
export { conv2d, type Conv2dOptions, type Pair } from "./ops/conv.ts";
export { avgPool2d, globalAvgPool } from "./ops/pool.ts";
export { batchNorm2d, type BatchNormOptions } from "./ops/batchnorm.ts";
