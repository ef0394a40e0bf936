// Prefill matmul: Y = X · Wᵀ with W in raw GGUF Q4_0 blocks (no f32 copy of the weights).
// Q4_0 block (18 B): f16 d, 16 B nibbles (low nibble of byte i = element i, high =
// element 16 + i); x = d * (q - 8).
// X: n_tokens rows of x_stride f32 from x_off; W: [rows, k] row-major, k a multiple of 32;
// Y[t, y_off + r] (rows of y_stride) = (acc != 0 ? Y : 0) + sum_i X[t, i] W[r, i].
// A workgroup computes a tile of 32 tokens x 64 rows: per 32-wide k step it dequantizes
// 64 blocks into workgroup memory (each of 256 threads an 8-element quarter block), stages
// the 32 x 32 X tile, and each thread accumulates 2 tokens x 4 rows.
// Grid: (ceil(rows / 64), ceil(n_tokens / 32)).

struct Params {
  n_tokens: u32, rows: u32, k: u32, x_stride: u32,
  x_off: u32, y_stride: u32, y_off: u32, acc: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

const TM: u32 = 32u;  // tokens per tile
const TN: u32 = 64u;  // weight rows per tile
const LD: u32 = 33u;  // padded row length of the staged tiles (32 + 1 against bank conflicts)

var<workgroup> ws: array<f32, 2112>;  // [TN][LD]
var<workgroup> xs: array<f32, 1056>;  // [TM][LD]

// Quarter `part` of block `bi` into ws[dst ..]: nibble word part -> elements 4 part + c (low)
// and 16 + 4 part + c (high). Blocks are 18 B: odd blocks start 2 bytes into a word.
fn load_quarter(bi: u32, part: u32, dst: u32) {
  let o = bi * 18u;
  let wi = o >> 2u;
  let odd = (o & 2u) != 0u;
  let w0 = w[wi];
  let d = unpack2x16float(select(w0, w0 >> 16u, odd)).x;
  let a = w[wi + part];
  let b = w[wi + part + 1u];
  let qw = select((a >> 16u) | (b << 16u), b, odd);
  let lo = vec4<f32>(vec4<u32>(qw, qw >> 8u, qw >> 16u, qw >> 24u) & vec4<u32>(0xfu));
  let hi = vec4<f32>(vec4<u32>(qw >> 4u, qw >> 12u, qw >> 20u, qw >> 28u) & vec4<u32>(0xfu));
  let vl = d * (lo - 8.0);
  let vh = d * (hi - 8.0);
  for (var c = 0u; c < 4u; c++) {
    ws[dst + part * 4u + c] = vl[c];
    ws[dst + 16u + part * 4u + c] = vh[c];
  }
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let nb = p.k / 32u;
  let row0 = wg.x * TN;
  let tok0 = wg.y * TM;
  // loader roles
  let lrow = lid / 4u;
  let part = lid % 4u;
  let ltok = lid / 8u;
  let lcol = (lid % 8u) * 4u;
  // compute roles: rows tx + 16 i (i < 4), tokens 2 ty + j (j < 2)
  let tx = lid % 16u;
  let ty = lid / 16u;
  var acc0 = vec4<f32>(0.0);
  var acc1 = vec4<f32>(0.0);
  for (var b = 0u; b < nb; b++) {
    let r = row0 + lrow;
    if (r < p.rows) {
      load_quarter(r * nb + b, part, lrow * LD);
    } else {
      for (var e = 0u; e < 8u; e++) { ws[lrow * LD + part * 4u + (e / 4u) * 16u + e % 4u] = 0.0; }
    }
    let t = tok0 + ltok;
    for (var e = 0u; e < 4u; e++) {
      var v = 0.0;
      if (t < p.n_tokens) { v = x[p.x_off + t * p.x_stride + b * 32u + lcol + e]; }
      xs[ltok * LD + lcol + e] = v;
    }
    workgroupBarrier();
    for (var kk = 0u; kk < 32u; kk++) {
      let wv = vec4<f32>(ws[tx * LD + kk], ws[(tx + 16u) * LD + kk], ws[(tx + 32u) * LD + kk], ws[(tx + 48u) * LD + kk]);
      acc0 += xs[(2u * ty) * LD + kk] * wv;
      acc1 += xs[(2u * ty + 1u) * LD + kk] * wv;
    }
    workgroupBarrier();
  }
  for (var j = 0u; j < 2u; j++) {
    let t = tok0 + 2u * ty + j;
    let a = select(acc0, acc1, j == 1u);
    for (var i = 0u; i < 4u; i++) {
      let r = row0 + tx + 16u * i;
      if (t < p.n_tokens && r < p.rows) {
        let o = t * p.y_stride + p.y_off + r;
        y[o] = select(0.0, y[o], p.acc != 0u) + a[i];
      }
    }
  }
}
