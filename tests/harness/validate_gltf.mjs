// Validate a .glb/.gltf file with the Khronos glTF validator and print its
// JSON report on stdout. Usage: node validate_gltf.mjs FILE [MAX_ISSUES]
// Exit code 0 when the validator ran (the report says whether the asset is
// valid), 2 on usage errors or when the validator itself failed.
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import validator from 'gltf-validator';

const [file, maxIssuesArg] = process.argv.slice(2);
if (!file) {
  console.error('usage: node validate_gltf.mjs FILE [MAX_ISSUES]');
  process.exit(2);
}

try {
  const bytes = new Uint8Array(await readFile(file));
  const dir = path.dirname(path.resolve(file));
  const report = await validator.validateBytes(bytes, {
    uri: path.basename(file),
    maxIssues: Number(maxIssuesArg ?? 200),
    // .gltf files may reference .bin buffers and images next to them.
    externalResourceFunction: async (uri) =>
      new Uint8Array(await readFile(path.resolve(dir, decodeURIComponent(uri)))),
  });
  process.stdout.write(JSON.stringify(report) + '\n');
} catch (err) {
  console.error(`gltf-validator failed on ${file}: ${err && err.stack ? err.stack : err}`);
  process.exit(2);
}
