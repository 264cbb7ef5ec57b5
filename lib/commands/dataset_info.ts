// What a shard folder says about itself: sizes.json (samples per shard), classes.txt and templates.txt.

function dirOf(shard: string): string | null {
  if (/^https?:\/\//.test(shard)) return null;
  const i = shard.lastIndexOf("/");
  return i < 0 ? "." : shard.slice(0, i);
}

function baseName(path: string): string {
  return path.slice(path.lastIndexOf("/") + 1);
}

/** Total samples of the given shards from the sizes.json files beside them, or null when any is unknown. */
export async function datasetSampleCount(shards: readonly string[]): Promise<number | null> {
  const cache = new Map<string, Record<string, number> | null>();
  let total = 0;
  for (const shard of shards) {
    const dir = dirOf(shard);
    if (dir === null) return null;
    if (!cache.has(dir)) {
      try {
        cache.set(dir, JSON.parse(await Deno.readTextFile(`${dir}/sizes.json`)));
      } catch {
        cache.set(dir, null);
      }
    }
    const n = cache.get(dir)?.[baseName(shard)];
    if (typeof n !== "number") return null;
    total += n;
  }
  return total;
}

export interface DatasetClasses {
  names: string[];
  templates: string[];
}

async function lines(path: string): Promise<string[] | null> {
  try {
    return (await Deno.readTextFile(path)).split("\n").map((l) => l.trim()).filter(Boolean);
  } catch {
    return null;
  }
}

/** Class names (classes.txt) and prompt templates (templates.txt, else CLIP's plain prompt) beside the shards. */
export async function datasetClasses(shards: readonly string[], classesFile?: string): Promise<DatasetClasses | null> {
  const dir = shards.length ? dirOf(shards[0]) : null;
  const names = classesFile ? await lines(classesFile) : dir === null ? null : await lines(`${dir}/classes.txt`);
  if (!names) return null;
  const templates = (dir === null ? null : await lines(`${dir}/templates.txt`)) ?? ["a photo of a {}."];
  return { names, templates };
}
