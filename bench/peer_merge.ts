/**
 * Puts the peer's numbers beside ours: peer value, ratio (oriented so that above 1 means ours is better) and the
 * peer's note; then the checks that both ran the same model on the same inputs (first embeddings, warm-up losses).
 */
import type { PeerOutput } from "./peer.ts";
import type { BenchRow } from "./shared.ts";

/** Units where less is better: their ratio is peer / ours. */
const LOWER_IS_BETTER = new Set(["MiB", "ms", "us/dispatch"]);

const significant = (x: number) => Number(x.toPrecision(3));

function appendNote(r: BenchRow, text: string): void {
  r.note = r.note ? `${r.note}; ${text}` : text;
}

function maxAbsDiff(a: number[], b: number[]): { diff: number; scale: number } {
  let diff = 0;
  let scale = 0;
  for (let i = 0; i < Math.min(a.length, b.length); i++) {
    diff = Math.max(diff, Math.abs(a[i] - b[i]));
    scale = Math.max(scale, Math.abs(b[i]));
  }
  return { diff: a.length === b.length ? diff : Infinity, scale };
}

export function mergePeer(rows: BenchRow[], peer: PeerOutput, ours: Record<string, unknown>): void {
  const byName = new Map(rows.map((r) => [r.name, r]));
  for (const r of rows) {
    const p = peer.rows[r.name];
    if (!p || p.value === null || !Number.isFinite(r.ours)) continue;
    r.peer = significant(p.value);
    const ratio = LOWER_IS_BETTER.has(r.unit) ? p.value / r.ours : r.ours / p.value;
    r.ratio = Number.isFinite(ratio) ? significant(ratio) : null;
    const others = Object.entries(p.byThreads).filter(([t, v]) => Number(t) !== p.threads && v !== null);
    const threads = `${p.threads} thread${p.threads > 1 ? "s" : ""}${
      others.map(([t, v]) => `; ${t}: ${significant(v!)}`).join("")
    }`;
    appendNote(r, `peer (${threads}): ${p.note}`);
  }
  for (const [check, rowName] of [["imageEmbedding", "vitb32_image_embed"], ["textEmbedding", "vitb32_text_embed"]]) {
    const a = ours[check] as number[] | undefined;
    const b = peer.checks[check] as number[] | undefined;
    const r = byName.get(rowName);
    if (!a || !b || !r) continue;
    const { diff, scale } = maxAbsDiff(a, b);
    appendNote(r, `first embedding vs peer: max abs diff ${diff.toExponential(1)} (max abs value ${scale.toFixed(2)})`);
  }
  const oursLosses = ours.losses as number[] | undefined;
  const peerLosses = peer.checks.losses as number[] | undefined;
  const train = byName.get("emoji_tiny_train");
  if (oursLosses && peerLosses && train) {
    const n = Math.min(2, oursLosses.length, peerLosses.length);
    const show = (xs: number[]) => xs.slice(0, n).map((x) => x.toFixed(5)).join(", ");
    appendNote(train, `losses of the first ${n} steps: ours ${show(oursLosses)}, peer ${show(peerLosses)}`);
  }
}
