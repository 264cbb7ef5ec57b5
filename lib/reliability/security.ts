/**
 * Security checks that run the real code paths: tar member names are never used as paths on disk (a shard whose
 * names climb out of the output folder or are absolute is embedded, and nothing appears outside the output folder),
 * weights are read only from safetensors (a folder holding only a PyTorch pickle is refused), and a redirect from
 * https to plain http is refused for shards. Downloads from a hub are checked by size and sha256 in tests/hub_test.ts.
 */
import { TarWriter } from "../data/tar_writer.ts";
import { redirectAllowed } from "../data/shards.ts";
import { resolveCheckpoint } from "../io/checkpoint_layout.ts";
import { loadModelConfig } from "../nn/config.ts";
import { runClip } from "./cli_process.ts";
import sharp from "sharp";

export interface SecurityResult {
  check: string;
  ok: boolean;
  detail: string;
}

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.lstat(path);
    return true;
  } catch {
    return false;
  }
}

export async function runSecurityChecks(workDir: string): Promise<SecurityResult[]> {
  const results: SecurityResult[] = [];

  // Hostile member names: parent-folder climbs and absolute paths, with and without a sample key.
  const outside = `${workDir}/outside-${crypto.randomUUID().slice(0, 8)}`;
  const names = [`../../${outside.split("/").pop()}/climb`, `${outside}/absolute`, "a/../../../etc/evil", "..", "./."];
  const shard = `${workDir}/hostile.tar`;
  const w = await TarWriter.create(shard);
  const png = new Uint8Array(
    await sharp({ create: { width: 8, height: 8, channels: 3, background: "red" } }).png().toBuffer(),
  );
  for (const name of names) {
    await w.add(`${name}.png`, png);
    await w.add(`${name}.txt`, new TextEncoder().encode("a caption"));
  }
  await w.close();
  const out = `${workDir}/embed-out`;
  const run = await runClip(["embed", "--model", "test-vit-micro", "--images", shard, "--texts", shard, "--out", out]);
  const escaped = (await Promise.all([outside, `${workDir}/../${outside.split("/").pop()}`, "/etc/evil"].map(exists)))
    .some(Boolean);
  results.push({
    check: "tar member names never become paths",
    ok: run.code === 0 && !escaped,
    detail: escaped ? "a file appeared outside the output folder" : `exit ${run.code}; ${names.length} hostile names`,
  });

  // A checkpoint folder with a pickle and no safetensors.
  const folder = `${workDir}/torch-checkpoint`;
  await Deno.mkdir(folder, { recursive: true });
  const config = await loadModelConfig("test-vit-micro");
  await Deno.writeTextFile(`${folder}/open_clip_config.json`, JSON.stringify({ model_cfg: config }));
  await Deno.writeFile(`${folder}/open_clip_pytorch_model.bin`, new Uint8Array([0x80, 0x02, 0x63, 0x6f, 0x73]));
  const refused = await resolveCheckpoint(folder).then(() => "", (e) => (e as Error).message);
  results.push({
    check: "weights only from safetensors",
    ok: /a PyTorch pickle, and no safetensors weights/.test(refused),
    detail: refused || "the folder with only a pickle was accepted",
  });

  const downgrade = !redirectAllowed("https://example.org/a.tar", "http://example.org/a.tar") &&
    redirectAllowed("http://example.org/a.tar", "http://mirror.example.org/a.tar") &&
    redirectAllowed("https://example.org/a.tar", "https://cdn.example.org/a.tar");
  results.push({
    check: "no https to http redirect for shards",
    ok: downgrade,
    detail: "https->http refused; http->http and https->https followed",
  });
  return results;
}
