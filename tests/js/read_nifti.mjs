// Read a NIfTI file (.nii or .nii.gz) with nifti-reader-js, the reader browser viewers build on, and print what
// it saw as one line of JSON: the header fields a viewer places the volume with, and the voxel bytes' SHA-256
// and sum. tests/test_nifti_single_member.py compares them with nibabel's reading of the same file.
//
//     node read_nifti.mjs FILE
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import * as nifti from "nifti-reader-js";

const TYPED = {
  2: Uint8Array,
  4: Int16Array,
  8: Int32Array,
  16: Float32Array,
  64: Float64Array,
  256: Int8Array,
  512: Uint16Array,
  768: Uint32Array,
  1024: BigInt64Array,
  1280: BigUint64Array,
};

const file = readFileSync(process.argv[2]);
let data = file.buffer.slice(file.byteOffset, file.byteOffset + file.byteLength);
const compressed = nifti.isCompressed(data);
if (compressed) {
  data = nifti.decompress(data); // fflate's gunzip, as in the browser
}
const header = nifti.readHeader(data);
const image = nifti.readImage(header, data);
const bytes = new Uint8Array(image);
const Typed = TYPED[header.datatypeCode];
let sum = 0;
if (Typed !== undefined) {
  const values = new Typed(image, 0, Math.floor(bytes.length / Typed.BYTES_PER_ELEMENT));
  for (const v of values) {
    sum += Number(v);
  }
}
console.log(
  JSON.stringify({
    compressed,
    decompressed_bytes: data.byteLength,
    dims: header.dims,
    datatype: header.datatypeCode,
    bits: header.numBitsPerVoxel,
    little_endian: header.littleEndian,
    vox_offset: header.vox_offset,
    sform_code: header.sform_code,
    qform_code: header.qform_code,
    intent_code: header.intent_code,
    affine: header.affine,
    image_bytes: bytes.length,
    sha256: createHash("sha256").update(bytes).digest("hex"),
    sum,
  }),
);
