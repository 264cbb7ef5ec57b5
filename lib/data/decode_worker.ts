/**
 * A decode worker of ./decode_pool.ts: decodes each image it is sent (sharp), applies the eval or training transform
 * (image.ts) straight into the job's slot of shared memory and answers with the job id. Several jobs are in flight
 * at once, so one image's resize overlaps the next one's decode in sharp's native threads.
 */
import { workerData } from "node:worker_threads";
import { type DecodeReply, type DecodeRequest, seededRandom } from "./decode_pool.ts";
import { decodeEvalImage, decodeTrainImage, ImageDecodeError } from "./image.ts";

const port = (workerData as { port?: MessagePort } | undefined)?.port;
if (!port) throw new Error("decode_worker.ts runs as a worker of decode_pool.ts, not on its own");

async function handle(request: DecodeRequest): Promise<DecodeReply> {
  const { id, slot, bytes, preprocess, cropSeed, limits } = request;
  const floats = 3 * preprocess.size * preprocess.size;
  const out = new Float32Array(request.output, slot * floats * 4, floats);
  try {
    if (cropSeed) await decodeTrainImage(bytes, preprocess, seededRandom(cropSeed), limits, out);
    else await decodeEvalImage(bytes, preprocess, limits, out);
    // Published after the pixels: the pool reads it before them.
    Atomics.store(new Int32Array(request.done), slot, id);
    return { id, ok: true };
  } catch (e) {
    if (e instanceof ImageDecodeError) return { id, undecodable: e.message };
    return { id, failure: e instanceof Error ? (e.stack ?? e.message) : String(e) };
  }
}

port.onmessage = async (e: MessageEvent<DecodeRequest>) => port.postMessage(await handle(e.data));
