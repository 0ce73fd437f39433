// Reading a zip archive in the browser, without a library: the central directory by hand,
// stored entries as they are and deflated ones through DecompressionStream("deflate-raw").
// Zip64 archives and encrypted entries are refused with a message.

const EOCD = 0x06054b50;
const CENTRAL = 0x02014b50;
const LOCAL = 0x04034b50;
export const MAX_ENTRIES = 20000;
export const MAX_TOTAL_BYTES = 1024 * 1024 * 1024;

export class ZipError extends Error {}

function findEnd(view) {
  const last = view.byteLength - 22;
  const first = Math.max(0, last - 65535);
  for (let at = last; at >= first; at--) {
    if (view.getUint32(at, true) === EOCD) return at;
  }
  throw new ZipError("this is not a zip archive (no end of central directory)");
}

/** The file entries of ``buffer`` (an ArrayBuffer): [{ name, method, offset, size, compressedSize }]. */
export function entries(buffer) {
  const view = new DataView(buffer);
  const end = findEnd(view);
  const count = view.getUint16(end + 10, true);
  let at = view.getUint32(end + 16, true);
  if (count === 0xffff || at === 0xffffffff) throw new ZipError("zip64 archives are not supported; make a plain zip");
  if (count > MAX_ENTRIES) throw new ZipError(`the archive holds ${count} entries, more than ${MAX_ENTRIES}`);
  const decoder = new TextDecoder();
  const found = [];
  let total = 0;
  for (let i = 0; i < count; i++) {
    if (at + 46 > view.byteLength || view.getUint32(at, true) !== CENTRAL) throw new ZipError("the zip's directory is damaged");
    const flags = view.getUint16(at + 8, true);
    const method = view.getUint16(at + 10, true);
    const compressedSize = view.getUint32(at + 20, true);
    const size = view.getUint32(at + 24, true);
    const nameLength = view.getUint16(at + 28, true);
    const extraLength = view.getUint16(at + 30, true);
    const commentLength = view.getUint16(at + 32, true);
    const offset = view.getUint32(at + 42, true);
    const name = decoder.decode(new Uint8Array(buffer, at + 46, nameLength));
    at += 46 + nameLength + extraLength + commentLength;
    if (name.endsWith("/")) continue; // a directory
    if (flags & 1) throw new ZipError(`${name} is encrypted; make a zip without a password`);
    if (method !== 0 && method !== 8) throw new ZipError(`${name} is compressed with method ${method}; use deflate`);
    total += size;
    if (total > MAX_TOTAL_BYTES) throw new ZipError("the archive unpacks to more than 1 GiB");
    found.push({ name, method, offset, size, compressedSize });
  }
  return found;
}

/** The bytes of one entry, as a Blob. */
export async function read(buffer, entry) {
  const view = new DataView(buffer);
  if (view.getUint32(entry.offset, true) !== LOCAL) throw new ZipError(`${entry.name}: damaged local header`);
  const start = entry.offset + 30 + view.getUint16(entry.offset + 26, true) + view.getUint16(entry.offset + 28, true);
  const data = new Uint8Array(buffer, start, entry.compressedSize);
  if (entry.method === 0) return new Blob([data]);
  const stream = new Blob([data]).stream().pipeThrough(new DecompressionStream("deflate-raw"));
  const blob = await new Response(stream).blob();
  if (blob.size !== entry.size) throw new ZipError(`${entry.name}: unpacked to ${blob.size} bytes, not ${entry.size}`);
  return blob;
}
