/**
 * Child process of loader_test.ts: takes one batch from a Loader with decode workers and returns from the program
 * without finishing or returning the iterator. The process must still exit.
 */
import { Loader } from "../lib/data/loader.ts";
import { liveDecodeWorkers } from "../lib/data/decode_pool.ts";
import { OPENAI_MEAN, OPENAI_STD } from "../lib/data/image.ts";
import { ClipTokenizer } from "../lib/data/tokenizer.ts";

const loader = new Loader({
  shards: Deno.args,
  tokenizer: await ClipTokenizer.load(),
  preprocess: { size: 16, mean: OPENAI_MEAN, std: OPENAI_STD },
  contextLength: 16,
  batchSize: 4,
  augment: false,
  decodeWorkers: 2,
});
const first = await loader.batches()[Symbol.asyncIterator]().next();
console.log(`first batch of ${first.value?.size}; ${liveDecodeWorkers()} decode workers running`);
