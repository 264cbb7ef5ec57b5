import { add, embedding, gatherRows, matmul } from "../tensor/ops.ts";
import type { Tensor } from "../tensor/tensor.ts";
import type { UnaryOp } from "../../kernels/elementwise.ts";
import type { TextConfig } from "./config.ts";
import { layerNormP, transformer } from "./layers.ts";
import type { Params } from "./params.ts";

/** The end-of-text position of each row: the largest id, as EOT is the last id in CLIP's vocabulary. */
export function eotPositions(tokens: Int32Array, contextLength: number): Int32Array {
  const rows = tokens.length / contextLength;
  const out = new Int32Array(rows);
  for (let r = 0; r < rows; r++) {
    let best = 0;
    for (let i = 1; i < contextLength; i++) {
      if (tokens[r * contextLength + i] > tokens[r * contextLength + best]) best = i;
    }
    out[r] = best;
  }
  return out;
}

/**
 * open_clip's text tower: token + positional embedding, causal pre-norm blocks, ln_final and projection of the
 * features at the EOT position. tokens: i32 [B, ctx], eot: i32 [B] -> [B, embed_dim]. The EOT rows are gathered
 * right after the last block's attention (see `transformer`) and the final layer norm follows the gather: both work
 * row by row, so the result is the same for B rows instead of B * ctx.
 */
export function encodeTextTower(p: Params, t: TextConfig, activation: UnaryOp, tokens: Tensor, eot: Tensor): Tensor {
  const x = add(embedding(p.get("token_embedding.weight"), tokens), p.get("positional_embedding"));
  const atEot = transformer(p, "transformer", x, t.layers, t.heads, true, activation, (rows) => gatherRows(rows, eot));
  const pooled = layerNormP(p, "ln_final", atEot);
  return matmul(pooled, p.get("text_projection"));
}
