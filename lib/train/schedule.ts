/**
 * open_clip's cosine schedule with linear warmup: lr = base * (step + 1) / warmup during warmup, then
 * 0.5 * (1 + cos(pi * e / es)) * base with e = step - warmup and es = total - warmup.
 */
export function cosineLr(base: number, warmup: number, total: number, step: number): number {
  if (step < warmup) return base * (step + 1) / warmup;
  const e = step - warmup;
  const es = total - warmup;
  return es <= 0 ? base : 0.5 * (1 + Math.cos(Math.PI * e / es)) * base;
}
