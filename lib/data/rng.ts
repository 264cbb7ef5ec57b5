/**
 * A small seeded PRNG (xoshiro128**, seeded through a splitmix32 stream) whose whole state is four 32-bit words,
 * so a training run can save it in a checkpoint and resume with exactly the same sequence.
 * All arithmetic is 32-bit (Math.imul and shifts): no BigInt, identical results on every platform.
 */

const TWO_POW_32 = 4294967296;
const TWO_POW_53 = 9007199254740992;

/** splitmix32's output function: a bijective 32-bit mix with good avalanche. */
function mix32(x: number): number {
  let t = x | 0;
  t = Math.imul(t ^ (t >>> 16), 0x21f0aaad);
  t = Math.imul(t ^ (t >>> 15), 0x735a2d97);
  return (t ^ (t >>> 15)) >>> 0;
}

function rotl(x: number, k: number): number {
  return (x << k) | (x >>> (32 - k));
}

function checkSeed(seed: number): void {
  if (!Number.isSafeInteger(seed)) throw new RangeError(`Rng seed must be a safe integer, got ${seed}`);
}

/** Folds a safe integer (negative allowed) into 32 bits without ignoring its high half. */
function hashInteger(h: number, value: number): number {
  const lo = value >>> 0;
  const hi = Math.floor(value / TWO_POW_32) | 0;
  return mix32((mix32(h ^ lo) + 0x9e3779b9) ^ mix32(hi + 0x7f4a7c15));
}

export class Rng {
  #s0 = 0;
  #s1 = 0;
  #s2 = 0;
  #s3 = 0;

  /** `seed` is any safe integer; different seeds give unrelated sequences. */
  constructor(seed: number) {
    checkSeed(seed);
    // A splitmix32 counter stream spreads one seed over the four state words.
    let counter = hashInteger(0x243f6a88, seed);
    const word = () => mix32(counter = (counter + 0x9e3779b9) | 0);
    this.#s0 = word();
    this.#s1 = word();
    this.#s2 = word();
    this.#s3 = word();
    if ((this.#s0 | this.#s1 | this.#s2 | this.#s3) === 0) this.#s0 = 1; // the all-zero state is a fixed point
  }

  /** A generator seeded from several integers (e.g. seed, epoch, worker): each combination gets its own stream. */
  static derive(...parts: number[]): Rng {
    let lo = 0x85ebca6b;
    let hi = 0xc2b2ae35;
    for (const part of parts) {
      checkSeed(part);
      lo = hashInteger(lo, part);
      hi = hashInteger(hi ^ lo, part);
    }
    // 21 + 32 bits keep the combined seed a safe integer.
    return new Rng((hi >>> 11) * TWO_POW_32 + lo);
  }

  /** Restores a generator saved with `state()`; it continues with exactly the sequence the saved one would have. */
  static fromState(state: readonly number[]): Rng {
    if (
      !Array.isArray(state) || state.length !== 4 ||
      !state.every((w) => Number.isInteger(w) && w >= 0 && w < TWO_POW_32) || state.every((w) => w === 0)
    ) {
      throw new RangeError(
        `Rng state must be four 32-bit unsigned integers, not all zero; got ${JSON.stringify(state)}`,
      );
    }
    const rng = new Rng(0);
    [rng.#s0, rng.#s1, rng.#s2, rng.#s3] = state;
    return rng;
  }

  /** The four state words (unsigned 32-bit integers), JSON-friendly. */
  state(): number[] {
    return [this.#s0, this.#s1, this.#s2, this.#s3];
  }

  /** The next unsigned 32-bit integer. */
  nextUint32(): number {
    const s0 = this.#s0, s1 = this.#s1;
    const result = Math.imul(rotl(Math.imul(s1, 5), 7), 9) >>> 0;
    const t = s1 << 9;
    this.#s2 ^= s0;
    this.#s3 ^= s1;
    this.#s1 ^= this.#s2;
    this.#s0 ^= this.#s3;
    this.#s2 ^= t;
    this.#s3 = rotl(this.#s3, 11);
    this.#s0 >>>= 0;
    this.#s1 >>>= 0;
    this.#s2 >>>= 0;
    this.#s3 >>>= 0;
    return result;
  }

  /** A float in [0, 1) with 53 random bits. */
  next(): number {
    const high = this.nextUint32() >>> 5; // 27 bits
    const low = this.nextUint32() >>> 6; // 26 bits
    return (high * 67108864 + low) / TWO_POW_53;
  }

  /** A uniform integer in [0, n); unbiased (rejection sampling) for n up to 2^32. */
  int(n: number): number {
    if (!Number.isSafeInteger(n) || n < 1) throw new RangeError(`Rng.int needs a positive integer, got ${n}`);
    if (n > TWO_POW_32) return Math.floor(this.next() * n);
    const limit = TWO_POW_32 - (TWO_POW_32 % n);
    for (;;) {
      const x = this.nextUint32();
      if (x < limit) return x % n;
    }
  }

  /** Fisher-Yates shuffle in place; returns the same array. */
  shuffle<T>(array: T[]): T[] {
    for (let i = array.length - 1; i > 0; i--) {
      const j = this.int(i + 1);
      const tmp = array[i];
      array[i] = array[j];
      array[j] = tmp;
    }
    return array;
  }
}
