/**
 * Output problems for `clip embed` and `clip train`: a read-only output folder, a path that runs through a file, a
 * missing folder (created), and a disk that fills up during the run. The read-only folder is a read-only tmpfs and
 * the full disk a small tmpfs where mounting is allowed (root); elsewhere the read-only folder is one the process has
 * no write permission for, and the full disk a file-size limit (`ulimit -f`, with SIGXFSZ ignored so writes fail
 * with EFBIG instead of killing the process). Each must end in a clear error, before or at the first write, and leave
 * no file under a final name that is not complete.
 */
import { ClipProcess, type ClipProcessOptions, makeImageShards, runClip, type RunResult } from "./cli_process.ts";

export interface OutputFaultResult {
  check: string;
  /** How the fault was made: tmpfs, ulimit, permissions or path. */
  method: string;
  ok: boolean;
  detail: string;
}

async function tryMount(dir: string, options: string): Promise<boolean> {
  try {
    const r = await new Deno.Command("mount", { args: ["-t", "tmpfs", "-o", options, "tmpfs", dir], stderr: "null" })
      .output();
    return r.success;
  } catch {
    return false;
  }
}

async function unmount(dir: string): Promise<void> {
  await new Deno.Command("umount", { args: [dir], stderr: "null" }).output().catch(() => {});
}

/** Files under `dir`, relative, recursively. */
async function listFiles(dir: string, prefix = ""): Promise<string[]> {
  const out: string[] = [];
  try {
    for await (const e of Deno.readDir(`${dir}/${prefix}`)) {
      const rel = prefix ? `${prefix}/${e.name}` : e.name;
      if (e.isDirectory) out.push(...await listFiles(dir, rel));
      else out.push(rel);
    }
  } catch {
    // absent or unreadable
  }
  return out;
}

function npyRows(bytes: Uint8Array): number | null {
  if (bytes.length < 10 || bytes[0] !== 0x93) return null;
  const headerLength = bytes[8] | (bytes[9] << 8);
  const header = new TextDecoder().decode(bytes.subarray(10, 10 + headerLength));
  const m = /'shape': \((\d+), (\d+)\)/.exec(header);
  if (!m) return null;
  const dtypeBytes = header.includes("<f2") ? 2 : 4;
  return 10 + headerLength + Number(m[1]) * Number(m[2]) * dtypeBytes === bytes.length ? Number(m[1]) : null;
}

/** Every .npy under a final name must be whole; temporary names must be gone. */
async function checkNoHalfFiles(dir: string): Promise<string[]> {
  const problems: string[] = [];
  for (const f of await listFiles(dir)) {
    if (/\.partial$|\.tmp-/.test(f)) problems.push(`temporary file left: ${f}`);
    if (f.endsWith(".npy") && npyRows(await Deno.readFile(`${dir}/${f}`)) === null) {
      problems.push(`${f} has a final name but is not a whole .npy file`);
    }
  }
  return problems;
}

function result(check: string, method: string, problems: string[], run: RunResult): OutputFaultResult {
  const message = run.stderr.trim().split("\n").filter((l) => l.startsWith("clip:")).at(-1) ?? "";
  return { check, method, ok: problems.length === 0, detail: problems.length ? problems.join("; ") : message };
}

const SIZE_LIMIT_PREFIX = (blocks: number) => ["bash", "-c", `trap '' XFSZ; ulimit -f ${blocks}; exec "$@"`, "--"];

export async function runOutputFaults(workDir: string): Promise<OutputFaultResult[]> {
  const results: OutputFaultResult[] = [];
  const lines = Array.from({ length: 3000 }, (_, i) => `a photo of thing number ${i}`).join("\n") + "\n";
  const textFile = `${workDir}/texts.txt`;
  await Deno.writeTextFile(textFile, lines);
  const embedTexts = (
    out: string,
  ) => ["embed", "--model", "test-vit-micro", "--texts", textFile, "--out", out, "--part-size", "1000"];
  const isRoot = Deno.uid() === 0;
  let shardPattern: Promise<string> | undefined;
  const shards = () =>
    shardPattern ??= (async () => {
      await Deno.mkdir(`${workDir}/shards`, { recursive: true });
      return await makeImageShards(`${workDir}/shards`, 1, 12);
    })();

  // A read-only output folder: refused before the model is loaded, nothing written.
  for (const command of ["embed", "train"] as const) {
    const dir = `${workDir}/readonly-${command}`;
    await Deno.mkdir(dir, { recursive: true });
    let method = "tmpfs";
    let options: ClipProcessOptions = {};
    if (!(await tryMount(dir, "ro,size=64k"))) {
      if (isRoot) {
        // Root writes through permission bits, so the folder is put out of reach with Deno's own permissions.
        method = "permissions";
        const permissions = ["--allow-read", "--allow-env", "--allow-sys", "--allow-ffi", "--allow-net"];
        options = { permissions: [...permissions, `--allow-write=${workDir}/scratch`] };
      } else {
        method = "chmod";
        await Deno.chmod(dir, 0o555);
      }
    }
    try {
      const out = `${dir}/out`;
      const args = command === "embed"
        ? embedTexts(out)
        : ["train", "--model", "test-vit-micro", "--train-data", await shards(), "--out", out, "--batch-size", "6"];
      const run = await runClip(args, options);
      const problems: string[] = [];
      if (run.code !== 1) problems.push(`exit code ${run.code}`);
      if (!/not a writable folder/.test(run.stderr) || !run.stderr.includes(out)) {
        problems.push("no clear error naming the folder");
      }
      if (/embedding with|training test-vit-micro/.test(run.stderr)) {
        problems.push("the error came after the work started");
      }
      if (/unexpected error/.test(run.stderr)) problems.push("reported as an unexpected error");
      results.push(result(`${command}: read-only output folder`, method, problems, run));
    } finally {
      if (method === "tmpfs") await unmount(dir);
      else if (method === "chmod") await Deno.chmod(dir, 0o755);
    }
  }

  // An output path through a file, and a missing folder (created).
  {
    await Deno.writeTextFile(`${workDir}/a-file`, "not a folder");
    const run = await runClip(embedTexts(`${workDir}/a-file/out`));
    const problems = run.code === 1 && /cannot be a folder|not a writable folder/.test(run.stderr) &&
        !/unexpected error/.test(run.stderr)
      ? []
      : [`exit ${run.code}: ${run.stderr.slice(0, 200)}`];
    results.push(result("embed: output path through a file", "path", problems, run));
    const created = `${workDir}/missing/deeper/out`;
    const made = await runClip([...embedTexts(created), "--part-size", "5000"]);
    const rows = npyRows(await Deno.readFile(`${created}/text_emb/text_emb_0.npy`).catch(() => new Uint8Array(0)));
    results.push(
      result(
        "embed: missing output folder is created",
        "path",
        rows === 3000 ? [] : [`exit ${made.code}, ${rows} rows`],
        made,
      ),
    );
  }

  // A disk that fills up: the first part fits, the second does not (or, by file-size limit, the first npy fails).
  {
    const dir = `${workDir}/full-embed`;
    await Deno.mkdir(dir, { recursive: true });
    const mounted = await tryMount(dir, "size=128k");
    try {
      const out = `${dir}/out`;
      const run = await new ClipProcess(embedTexts(out), mounted ? {} : { prefix: SIZE_LIMIT_PREFIX(40) }).wait();
      const problems = await checkNoHalfFiles(out);
      if (run.code !== 1) problems.push(`exit code ${run.code}`);
      if (!/cannot write to .*(disk is full|size the file system)/.test(run.stderr)) {
        problems.push("no clear disk-full error");
      }
      results.push(
        result("embed: disk full during the run", mounted ? "tmpfs 128 KiB" : "ulimit -f 40 KiB", problems, run),
      );
    } finally {
      if (mounted) await unmount(dir);
    }
  }
  {
    const dir = `${workDir}/full-train`;
    await Deno.mkdir(dir, { recursive: true });
    const mounted = await tryMount(dir, "size=4m");
    try {
      const out = `${dir}/out`;
      const args = [
        "train",
        "--model",
        "test-vit-micro",
        "--train-data",
        await shards(),
        "--out",
        out,
        "--batch-size",
        "6",
        "--save-every",
        "1",
        "--workers",
        "1",
      ];
      const run = await new ClipProcess(args, mounted ? {} : { prefix: SIZE_LIMIT_PREFIX(1024) }).wait();
      const problems: string[] = [];
      if (run.code !== 1) problems.push(`exit code ${run.code}`);
      if (!/cannot write to .*(disk is full|size the file system)/.test(run.stderr)) {
        problems.push("no clear disk-full error");
      }
      const files = await listFiles(out);
      if (files.some((f) => /^checkpoints\/step-\d+\//.test(f))) {
        problems.push("a step folder exists though no checkpoint fit");
      }
      const latest = await Deno.readTextFile(`${out}/latest`).catch(() => null);
      if (latest !== null) problems.push(`latest names ${latest.trim()} though no checkpoint fit`);
      results.push(
        result("train: disk full at the first checkpoint", mounted ? "tmpfs 4 MiB" : "ulimit -f 1 MiB", problems, run),
      );
    } finally {
      if (mounted) await unmount(dir);
    }
  }
  return results;
}
