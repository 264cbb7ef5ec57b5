// Progress lines on stderr with rate and ETA: redrawn in place on a terminal, a line every 10 s in logs.

export function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) return "?";
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  return h > 0 ? `${h}h${String(m).padStart(2, "0")}m` : `${m}m${String(s % 60).padStart(2, "0")}s`;
}

export class Progress {
  readonly #encoder = new TextEncoder();
  readonly #tty = Deno.stderr.isTerminal();
  readonly #started = performance.now();
  #lastPrint = -Infinity;
  #done = 0;
  #drawn = false;

  /**
   * @param unit what is counted ("images", "texts")
   * @param total how many will be counted, or null when unknown (no ETA then)
   * @param detail extra text for the line (e.g. which part is being written)
   */
  constructor(readonly unit: string, readonly total: number | null, public detail = "") {}

  get count(): number {
    return this.#done;
  }

  get seconds(): number {
    return (performance.now() - this.#started) / 1000;
  }

  get rate(): number {
    return this.#done / Math.max(1e-9, this.seconds);
  }

  line(): string {
    const rate = this.rate;
    const of = this.total !== null ? `/${this.total}` : "";
    const eta = this.total !== null && rate > 0 ? `  eta ${formatDuration((this.total - this.#done) / rate)}` : "";
    const detail = this.detail ? `  ${this.detail}` : "";
    return `${this.#done}${of} ${this.unit}  ${rate.toFixed(1)} ${this.unit}/s  elapsed ${
      formatDuration(this.seconds)
    }${eta}${detail}`;
  }

  advance(n: number): void {
    this.#done += n;
    const now = performance.now();
    if (now - this.#lastPrint < (this.#tty ? 250 : 10_000)) return;
    this.#lastPrint = now;
    this.#print();
  }

  /** Prints the final state and ends the line. */
  finish(): void {
    this.#print();
    if (this.#tty) Deno.stderr.writeSync(this.#encoder.encode("\n"));
    this.#drawn = false;
  }

  /** Prints a message without tearing the progress line. */
  note(message: string): void {
    if (this.#tty && this.#drawn) Deno.stderr.writeSync(this.#encoder.encode("\r\x1b[K"));
    console.error(message);
    this.#drawn = false;
  }

  #print(): void {
    if (this.#tty) {
      Deno.stderr.writeSync(this.#encoder.encode(`\r\x1b[K${this.line()}`));
      this.#drawn = true;
    } else console.error(this.line());
  }
}
