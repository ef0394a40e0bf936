// numerics="ggml": y = W x for Q4_1 / Q8_0 weights (repacked: GgmlOps.repack) and activations from
// ggml_quantize (Q8_1 for Q4_1, Q8_0 for Q8_0), as ggml_vec_dot_q4_1_q8_1 /
// ggml_vec_dot_q8_0_q8_0 (AVX-512 VNNI) and tinyBLAS compute them (ggml_numerics.matmuls):
// per block b and lane l (block elements 4l .. 4l+3) the exact integer isum[b, l]
// (dot4I8Packed; Q4_1's nibbles are bytes 0..15, so the signed dot is right for them too);
// acc[l] = fma(dw_b * dx_b, isum[b, l], acc[l]) over b in order; then
// ((acc0 + acc4) + (acc2 + acc6)) + ((acc1 + acc5) + (acc3 + acc7)); Q4_1 adds
// summs = sum over b in order of mw_b * sx_b. Then + bias[bias_off + r] (has_bias), then
// + the old y (acc_y: the residual add).
// W: [rows, k] (k a multiple of 32); x: n_tokens rows of k / 32 blocks (ggml_quantize);
// y[t * y_stride + y_off + r]. One invocation per (row, token); lanes 0-3 and 4-7 in two vec4
// (no private arrays: SwiftShader keeps those in memory), 16-byte loads.
// Grid: (min(G, 65535), ceil(G / 65535)) with G = ceil(rows * n_tokens / WG).

//!include ggml_lib

override QTYPE: u32 = 3u;  // GGML type id: 3 Q4_1, 8 Q8_0
override WG: u32 = 64u;

struct Params { rows: u32, k: u32, n_tokens: u32, y_stride: u32, y_off: u32, acc_y: u32,
                has_bias: u32, bias_off: u32, zero: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> wq: array<vec4<u32>>;  // quants: 1 (Q4_1) or 2 (Q8_0) a block
@group(0) @binding(2) var<storage, read> wd: array<u32>;        // f16 d | f16 m << 16, a block
@group(0) @binding(3) var<storage, read> xq: array<vec4<u32>>;  // 2 a block
@group(0) @binding(4) var<storage, read> xd: array<vec2<f32>>;  // (d, s) a block
@group(0) @binding(5) var<storage, read_write> y: array<f32>;
@group(0) @binding(6) var<storage, read> bias: array<f32>;

const LO: u32 = 0x0f0f0f0fu;

fn dot4x4(a: vec4<u32>, b: vec4<u32>) -> vec4<i32> {
  return vec4<i32>(dot4I8Packed(a.x, b.x), dot4I8Packed(a.y, b.y), dot4I8Packed(a.z, b.z), dot4I8Packed(a.w, b.w));
}

struct Acc { a: vec4<f32>, b: vec4<f32>, summs: f32 }

fn block(acc: Acc, wi: u32, x0: vec4<u32>, x1: vec4<u32>, xs: vec2<f32>) -> Acc {
  let dm = unpack2x16float(wd[wi]);
  var ia: vec4<i32>;
  var ib: vec4<i32>;
  var summs = acc.summs;
  if (QTYPE == 3u) {  // Q4_1: element j is the low nibble of quant byte j, j + 16 the high one
    let q = wq[wi];
    summs = summs + dm.y * xs.y;
    ia = dot4x4(q & vec4<u32>(LO), x0);
    ib = dot4x4((q >> vec4<u32>(4u)) & vec4<u32>(LO), x1);
  } else {  // Q8_0: 32 int8
    ia = dot4x4(wq[2u * wi], x0);
    ib = dot4x4(wq[2u * wi + 1u], x1);
  }
  let dd = dm.x * xs.x;
  return Acc(fma_x4(dd, vec4<f32>(ia), acc.a), fma_x4(dd, vec4<f32>(ib), acc.b), summs);
}

fn finish(acc: Acc, r: u32, t: u32) {
  let s = acc.a + acc.b;  // (acc0 + acc4, acc1 + acc5, acc2 + acc6, acc3 + acc7)
  var v = (s.x + s.z) + (s.y + s.w);
  if (QTYPE == 3u) { v = v + acc.summs; }
  if (p.has_bias != 0u) { v = v + bias[p.bias_off + r]; }
  let yi = t * p.y_stride + p.y_off + r;
  if (p.acc_y != 0u) { v = v + y[yi]; }
  y[yi] = v;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let i = (wg.x + wg.y * nwg.x) * WG + lid;
  if (i >= p.rows * p.n_tokens) { return; }
  let r = i % p.rows;
  let t = i / p.rows;
  let nb = p.k / 32u;
  var acc = Acc(vec4<f32>(0.0), vec4<f32>(0.0), 0.0);
  for (var b = 0u; b < nb; b++) {
    let xi = t * nb + b;
    acc = block(acc, r * nb + b, xq[2u * xi], xq[2u * xi + 1u], xd[xi]);
  }
  finish(acc, r, t);
}
