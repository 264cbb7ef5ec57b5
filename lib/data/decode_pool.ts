/**
 * Image decoding and preprocessing in background threads (./decode_worker.ts), so that neither sharp's glue code
 * nor the resize, which run as JavaScript, hold up the thread that reads shards and records GPU work.
 *
 * A `DecodePool` owns the workers; each consumer (a Loader pass) opens a `session` with its own slots of shared
 * memory, into which the workers write the pixels: no 600 KB buffer is allocated, transferred and collected per
 * image, and one session holding its slots never starves another. Jobs go to the worker with the fewest in flight
 * and results come back by job id, so the output never depends on which worker did the work.
 *
 * Starting a worker costs about 0.1-0.2 s of CPU and its code runs cold for a while, so a program that makes many
 * Loaders (one per epoch) should keep one pool for all of them.
 *
 * Workers are node:worker_threads workers talking over a MessageChannel: Deno lets node workers be unref'd and its
 * message ports be ref'd and unref'd, which web workers cannot. So a pool keeps the process alive only while jobs
 * are in flight, and one that is never closed does not stop the program from exiting. (Messages through Deno's
 * node-worker channel are copied slowly; MessagePort transfers are fast.)
 */
import { Worker } from "node:worker_threads";
import { ClipError } from "../errors.ts";
import { decodeEvalImage, type DecodeLimits, decodeTrainImage, ImageDecodeError, type Preprocess } from "./image.ts";
import { Rng } from "./rng.ts";

/** One image to decode: the eval transform, or the training transform when `cropSeed` is given. */
export interface DecodeJob {
  /** Encoded image. A pool hands it to a worker: its buffer is detached unless it is shared. */
  bytes: Uint8Array;
  preprocess: Preprocess;
  /** The parts of `Rng.derive(...)` that draw the random resized crop; absent for the eval transform. */
  cropSeed?: readonly number[];
  limits?: DecodeLimits;
}

/** A decoded image: [3, size, size] float32 pixels, valid until `release()`. */
export interface DecodedImage {
  readonly pixels: Float32Array;
  /** Gives the pixels' memory back for reuse; read them no more. */
  release(): void;
}

/** Something that turns encoded images into model inputs. */
export interface ImageDecoder {
  /** Rejects with ImageDecodeError for an undecodable image, as image.ts does. */
  decode(job: DecodeJob): Promise<DecodedImage>;
  /** Stops; jobs in flight are rejected. */
  close(): Promise<void>;
}

/** A job as sent to a worker: its pixels go to `slot` of `output`, then its id to `done[slot]`. */
export interface DecodeRequest extends DecodeJob {
  id: number;
  output: SharedArrayBuffer;
  done: SharedArrayBuffer;
  slot: number;
}

/** A worker's answer: pixels written to the job's slot, an undecodable image, or an unexpected failure. */
export type DecodeReply =
  | { id: number; ok: true }
  | { id: number; undecodable: string }
  | { id: number; failure: string };

/** The crop sampler's uniform [0, 1) draws for `Rng.derive(...cropSeed)`. */
export function seededRandom(cropSeed: readonly number[]): () => number {
  const rng = Rng.derive(...cropSeed);
  return () => rng.next();
}

/** Decodes on the calling thread (sharp still decodes in its own native threads). */
export class LocalDecoder implements ImageDecoder {
  // Released outputs, reused: fresh memory costs page faults on every first touch.
  readonly #spare: Float32Array[] = [];

  async decode(job: DecodeJob): Promise<DecodedImage> {
    const { bytes, preprocess, cropSeed, limits } = job;
    const floats = 3 * preprocess.size * preprocess.size;
    const index = this.#spare.findIndex((s) => s.length === floats);
    const out = index >= 0 ? this.#spare.splice(index, 1)[0] : new Float32Array(floats);
    const pixels = cropSeed
      ? await decodeTrainImage(bytes, preprocess, seededRandom(cropSeed), limits, out)
      : await decodeEvalImage(bytes, preprocess, limits, out);
    let released = false;
    return {
      pixels,
      release: () => {
        if (released) return;
        released = true;
        this.#spare.push(pixels);
      },
    };
  }

  close(): Promise<void> {
    this.#spare.length = 0;
    return Promise.resolve();
  }
}

let liveWorkers = 0;

/** Decode workers started and not yet exited, in this process (for tests and diagnostics). */
export function liveDecodeWorkers(): number {
  return liveWorkers;
}

/** Beyond this many decode workers the thread reading the shards keeps up no more, and each costs an isolate. */
const MAX_DEFAULT_WORKERS = 8;

/** The default pool size: one worker per core, up to 8. */
export function defaultDecodeWorkers(): number {
  return Math.min(MAX_DEFAULT_WORKERS, Math.max(1, navigator.hardwareConcurrency || 1));
}

/** Deno's MessagePort, which can stop keeping the event loop alive (not in the DOM typings). */
type RefablePort = MessagePort & { ref(): void; unref(): void };

interface PoolWorker {
  worker: Worker;
  port: RefablePort;
  inFlight: number;
  exited: Promise<void>;
}

interface Pending {
  session: Session;
  slot: number;
  resolve: (image: DecodedImage) => void;
  reject: (e: Error) => void;
}

export class DecodePool {
  readonly #workers: PoolWorker[] = [];
  readonly #pending = new Map<number, Pending>();
  #nextId = 1;
  #closed = false;
  #failure: Error | undefined;

  constructor(workers: number = defaultDecodeWorkers()) {
    if (!Number.isInteger(workers) || workers < 1) throw new RangeError(`decode workers must be >= 1, got ${workers}`);
    for (let w = 0; w < workers; w++) this.#start(w);
  }

  get size(): number {
    return this.#workers.length;
  }

  #start(index: number): void {
    const { port1, port2 } = new MessageChannel();
    const port = port1 as RefablePort;
    const worker = new Worker(new URL("./decode_worker.ts", import.meta.url), {
      workerData: { port: port2 },
      transferList: [port2 as unknown as never],
    });
    liveWorkers++;
    worker.unref();
    port.unref();
    const exited = new Promise<void>((resolve) => worker.once("exit", () => (liveWorkers--, resolve())));
    port.onmessage = (e: MessageEvent<DecodeReply>) => this.#settle(index, e.data);
    worker.on("error", (e: Error) => this.#fail(new ClipError(`an image decode worker failed: ${e.message}`)));
    worker.on("exit", (code: number) => {
      if (!this.#closed) this.#fail(new ClipError(`an image decode worker exited unexpectedly (code ${code})`));
    });
    this.#workers.push({ worker, port, inFlight: 0, exited });
  }

  /**
   * A decoder on this pool's workers with `slots` images of 3 x `size` x `size` floats in flight or held at once
   * (more wait for a `release()`). Closing it leaves the pool running.
   */
  session(slots: number, size: number): ImageDecoder {
    this.#checkOpen();
    return new Session(
      {
        submit: (request, pending) => this.#submit(request, pending),
        abandon: (s, reason) => this.#abandon(s, reason),
      },
      slots,
      size,
    );
  }

  #checkOpen(): void {
    if (this.#failure) throw this.#failure;
    if (this.#closed) throw new ClipError("the image decode pool is closed");
  }

  /** Sends a job whose slot is reserved; settles through `pending`. */
  #submit(request: Omit<DecodeRequest, "id">, pending: Pending): void {
    this.#checkOpen();
    let index = 0;
    for (let w = 1; w < this.#workers.length; w++) {
      if (this.#workers[w].inFlight < this.#workers[index].inFlight) index = w;
    }
    const target = this.#workers[index];
    const id = this.#nextId++;
    const bytes = ownedBytes(request.bytes);
    this.#pending.set(id, pending);
    if (target.inFlight++ === 0) target.port.ref();
    target.port.postMessage({ ...request, bytes, id }, bytes.buffer instanceof ArrayBuffer ? [bytes.buffer] : []);
  }

  #settle(index: number, reply: DecodeReply): void {
    const target = this.#workers[index];
    if (--target.inFlight === 0) target.port.unref();
    const pending = this.#pending.get(reply.id);
    if (!pending) return;
    this.#pending.delete(reply.id);
    if ("ok" in reply) pending.session.deliver(pending, reply.id);
    else {
      pending.session.freeSlot(pending.slot);
      if ("undecodable" in reply) pending.reject(new ImageDecodeError(reply.undecodable));
      else pending.reject(new ClipError(`image decoding failed unexpectedly: ${reply.failure}`));
    }
  }

  /** Rejects the jobs of `session` still in flight (their slots are abandoned with the session). */
  #abandon(session: Session, reason: Error): void {
    for (const [id, p] of this.#pending) {
      if (p.session !== session) continue;
      this.#pending.delete(id);
      p.reject(reason);
    }
  }

  #fail(e: Error): void {
    if (this.#failure) return;
    this.#failure = e;
    void this.close();
  }

  /** Stops every worker; jobs still in flight are rejected. Resolves once all have exited. */
  async close(): Promise<void> {
    if (!this.#closed) {
      this.#closed = true;
      const stopped = this.#failure ?? new ClipError("the image decode pool was closed with images in flight");
      for (const p of this.#pending.values()) p.reject(stopped);
      this.#pending.clear();
      for (const w of this.#workers) {
        w.port.close();
        void w.worker.terminate();
      }
    }
    await Promise.all(this.#workers.map((w) => w.exited));
  }
}

/** What a session needs of its pool. */
interface PoolAccess {
  submit(request: Omit<DecodeRequest, "id">, pending: Pending): void;
  abandon(session: Session, reason: Error): void;
}

/** One consumer's slots on a pool. */
class Session implements ImageDecoder {
  readonly #output: SharedArrayBuffer;
  readonly #doneBuffer: SharedArrayBuffer;
  readonly #done: Int32Array;
  readonly #floatsPerSlot: number;
  readonly #freeSlots: number[];
  readonly #slotWaiters: { resolve: (slot: number) => void; reject: (e: Error) => void }[] = [];
  #closed = false;

  constructor(private readonly pool: PoolAccess, slots: number, readonly size: number) {
    for (const [name, value] of [["slots", slots], ["size", size]] as const) {
      if (!Number.isInteger(value) || value < 1) throw new RangeError(`decode ${name} must be >= 1, got ${value}`);
    }
    this.#floatsPerSlot = 3 * size * size;
    this.#output = new SharedArrayBuffer(slots * this.#floatsPerSlot * 4);
    this.#doneBuffer = new SharedArrayBuffer(slots * 4);
    this.#done = new Int32Array(this.#doneBuffer);
    this.#freeSlots = Array.from({ length: slots }, (_, i) => slots - 1 - i);
  }

  async decode(job: DecodeJob): Promise<DecodedImage> {
    if (job.preprocess.size !== this.size) {
      throw new RangeError(`this decoder makes ${this.size} px inputs, not ${job.preprocess.size} px`);
    }
    const slot = await this.#takeSlot();
    return new Promise<DecodedImage>((resolve, reject) => {
      const request = { ...job, output: this.#output, done: this.#doneBuffer, slot };
      try {
        this.pool.submit(request, { session: this, slot, resolve, reject });
      } catch (e) {
        this.freeSlot(slot);
        reject(e);
      }
    });
  }

  #takeSlot(): Promise<number> {
    if (this.#closed) return Promise.reject(new ClipError("the image decoder is closed"));
    const slot = this.#freeSlots.pop();
    if (slot !== undefined) return Promise.resolve(slot);
    return new Promise((resolve, reject) => this.#slotWaiters.push({ resolve, reject }));
  }

  freeSlot(slot: number): void {
    const waiter = this.#slotWaiters.shift();
    if (waiter) waiter.resolve(slot);
    else this.#freeSlots.push(slot);
  }

  deliver(pending: Pending, id: number): void {
    const { slot } = pending;
    // The worker stores the job id after writing the pixels: loading it here orders those writes before our reads.
    if (Atomics.load(this.#done, slot) !== id) {
      pending.reject(new ClipError(`decode slot ${slot} does not hold image ${id}`));
      return;
    }
    let released = false;
    pending.resolve({
      pixels: new Float32Array(this.#output, slot * this.#floatsPerSlot * 4, this.#floatsPerSlot),
      release: () => {
        if (released) return;
        released = true;
        this.freeSlot(slot);
      },
    });
  }

  close(): Promise<void> {
    if (!this.#closed) {
      this.#closed = true;
      const stopped = new ClipError("the image decoder was closed with images in flight");
      for (const w of this.#slotWaiters.splice(0)) w.reject(stopped);
      this.pool.abandon(this, stopped);
    }
    return Promise.resolve();
  }
}

/** The bytes in a buffer of their own, so that transferring it detaches nothing else. */
function ownedBytes(bytes: Uint8Array): Uint8Array {
  const whole = bytes.buffer instanceof ArrayBuffer && bytes.byteOffset === 0 &&
    bytes.byteLength === bytes.buffer.byteLength;
  return whole ? bytes : bytes.slice();
}
