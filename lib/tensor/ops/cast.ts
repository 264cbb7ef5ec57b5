import { castKernel, elementGroups } from "../../../kernels/elementwise.ts";
import { record } from "../autograd.ts";
import { empty } from "../create.ts";
import type { Tensor } from "../tensor.ts";

/** Float element types a tensor can be cast between. */
export type FloatType = "f32" | "f16";

/**
 * The values of `x` as `dtype` (rounded to nearest even when narrowing to f16). Gradients stay f32 whatever the
 * forward type, so the backward rule passes the incoming gradient through unchanged: no gradient is ever rounded to
 * f16, which is why f16 training here needs no loss scaling.
 */
export function cast(x: Tensor, dtype: FloatType): Tensor {
  if (x.dtype === dtype) return x;
  if (x.dtype === "i32") throw new Error(`cast: ${x} is not a float tensor`);
  if (!x.gpu.hasF16) {
    throw new Error("cast to or from f16 needs the adapter's shader-f16 feature, which this adapter lacks");
  }
  const out = empty(x.gpu, x.shape, dtype);
  x.gpu.dispatch(castKernel(x.size, x.dtype, dtype), [x.buffer, out.buffer], elementGroups(x.size));
  return record(out, "cast", [x], (g) => [g.view(x.shape)]);
}
