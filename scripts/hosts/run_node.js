// Host runner for ONNX Runtime native through onnxruntime-node (deepImageJ pins ORT 1.13.1); no project
// code. Same job file and outputs as run_python.py: OUT/<package>.onnx.<tensor>.npy or .error.
// usage: node run_node.js JOB OUT [LEVEL]   (NODE_PATH: the environment's node_modules; LEVEL: graph optimisation
// level disabled / basic / extended / all, default: the session's default)
'use strict';
const fs = require('fs');
const path = require('path');
const ort = require('onnxruntime-node');

// .npy (format 1.0/2.0, little endian, C order) <-> onnxruntime-node tensors
const DTYPES = {
  '<f4': ['float32', Float32Array], '<f8': ['float64', Float64Array], '<i8': ['int64', BigInt64Array],
  '<i4': ['int32', Int32Array], '|u1': ['uint8', Uint8Array], '|i1': ['int8', Int8Array],
  '<i2': ['int16', Int16Array], '<u2': ['uint16', Uint16Array], '|b1': ['bool', Uint8Array],
};

function readNpy(file) {
  const buf = fs.readFileSync(file);
  if (buf.toString('latin1', 1, 6) !== 'NUMPY') throw new Error(`${file}: not a .npy file`);
  const major = buf[6];
  const headerLen = major === 1 ? buf.readUInt16LE(8) : buf.readUInt32LE(8);
  const start = major === 1 ? 10 : 12;
  const header = buf.toString('latin1', start, start + headerLen);
  const descr = /'descr':\s*'([^']+)'/.exec(header)[1];
  if (/'fortran_order':\s*True/.test(header)) throw new Error(`${file}: Fortran order`);
  const shape = /'shape':\s*\(([^)]*)\)/.exec(header)[1].split(',').filter((s) => s.trim()).map(Number);
  const [type, Ctor] = DTYPES[descr] || [];
  if (!type) throw new Error(`${file}: dtype ${descr}`);
  const body = buf.subarray(start + headerLen);
  const copy = new Uint8Array(body.length);
  copy.set(body);
  let data = new Ctor(copy.buffer, 0, body.length / Ctor.BYTES_PER_ELEMENT);
  if (type === 'bool') data = Uint8Array.from(data);
  return new ort.Tensor(type, data, shape);
}

function writeNpy(file, tensor) {
  const descr = Object.keys(DTYPES).find((k) => DTYPES[k][0] === tensor.type);
  if (!descr) throw new Error(`output dtype ${tensor.type}`);
  const shape = tensor.dims.length === 1 ? `(${tensor.dims[0]},)` : `(${tensor.dims.join(', ')})`;
  let header = `{'descr': '${descr}', 'fortran_order': False, 'shape': ${shape}, }`;
  header += ' '.repeat(63 - ((10 + header.length) % 64)) + '\n';
  const pre = Buffer.alloc(10);
  pre.write('\x93NUMPY', 0, 'latin1');
  pre[6] = 1;
  pre[7] = 0;
  pre.writeUInt16LE(header.length, 8);
  const data = Buffer.from(tensor.data.buffer, tensor.data.byteOffset, tensor.data.byteLength);
  fs.writeFileSync(file, Buffer.concat([pre, Buffer.from(header, 'latin1'), data]));
}

async function main() {
  const [jobFile, out, level] = process.argv.slice(2);
  const options = level ? { graphOptimizationLevel: level } : undefined;
  const job = JSON.parse(fs.readFileSync(jobFile, 'utf8'));
  fs.mkdirSync(out, { recursive: true });
  for (const [name, pkg] of Object.entries(job.packages)) {
    if (!pkg.weights.onnx) continue;
    try {
      const session = await ort.InferenceSession.create(pkg.weights.onnx, options);  // default: as a host
      const feeds = {};
      for (const [tensor, file] of pkg.inputs) feeds[tensor] = readNpy(file);
      const results = await session.run(feeds);
      for (const [tensor] of pkg.outputs) writeNpy(path.join(out, `${name}.onnx.${tensor}.npy`), results[tensor]);
    } catch (e) {  // a host failure is a result: recorded, and the next package runs
      fs.writeFileSync(path.join(out, `${name}.onnx.error`), String(e && e.stack ? e.stack : e));
    }
  }
}

main().catch((e) => { console.error(e); process.exit(1); });
