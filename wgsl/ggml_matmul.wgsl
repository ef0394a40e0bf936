// numerics="ggml": y = W x for Q4_1 / Q8_0 weights in raw GGUF blocks and activations from
// ggml_quantize (Q8_1 for Q4_1, Q8_0 for Q8_0), as ggml_vec_dot_q4_1_q8_1 /
// ggml_vec_dot_q8_0_q8_0 (AVX-512 VNNI) and tinyBLAS compute them (ggml_numerics.matmuls):
// per block b and lane l (block elements 4l .. 4l+3) the exact integer isum[b, l];
// acc[l] = fma(dw_b * dx_b, isum[b, l], acc[l]) over b in order; then
// ((acc0 + acc4) + (acc2 + acc6)) + ((acc1 + acc5) + (acc3 + acc7)); Q4_1 adds
// summs = sum over b in order of mw_b * sx_b. Then + bias[bias_off + r] (has_bias), then
// + the old y (acc_y: the residual add).
// W: [rows, k] (k a multiple of 32); xq: n_tokens rows of k / 32 blocks (ggml_quantize);
// y[t * y_stride + y_off + r]. One invocation per (row, token).
// Grid: (min(G, 65535), ceil(G / 65535)) with G = ceil(rows * n_tokens / 64).

//!include ggml_lib

override QTYPE: u32 = 3u;  // GGML type id: 3 Q4_1, 8 Q8_0

struct Params { rows: u32, k: u32, n_tokens: u32, y_stride: u32, y_off: u32, acc_y: u32,
                has_bias: u32, bias_off: u32, zero: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read> xq: array<u32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;

fn sdot4(a: u32, b: u32) -> i32 {  // sum of the products of the four int8 of a and of b
  let va = vec4<i32>(bitcast<i32>(a << 24u), bitcast<i32>(a << 16u), bitcast<i32>(a << 8u), bitcast<i32>(a)) >> vec4<u32>(24u);
  let vb = vec4<i32>(bitcast<i32>(b << 24u), bitcast<i32>(b << 16u), bitcast<i32>(b << 8u), bitcast<i32>(b)) >> vec4<u32>(24u);
  return dot(va, vb);
}

fn udot4(nib: u32, b: u32) -> i32 {  // four 4-bit unsigned values (bytes of nib) times int8 of b
  let va = vec4<i32>(vec4<u32>(nib, nib >> 8u, nib >> 16u, nib >> 24u) & vec4<u32>(0xfu));
  let vb = vec4<i32>(bitcast<i32>(b << 24u), bitcast<i32>(b << 16u), bitcast<i32>(b << 8u), bitcast<i32>(b)) >> vec4<u32>(24u);
  return dot(va, vb);
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let i = (wg.x + wg.y * nwg.x) * 64u + lid;
  if (i >= p.rows * p.n_tokens) { return; }
  let r = i % p.rows;
  let t = i / p.rows;
  let nb = p.k / 32u;
  var acc = array<f32, 8>(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
  var summs = 0.0;
  for (var b = 0u; b < nb; b++) {
    let xb = (t * nb + b) * 10u;
    let dx = bitcast<f32>(xq[xb]);
    var isum = array<i32, 8>(0, 0, 0, 0, 0, 0, 0, 0);
    var dw = 0.0;
    if (QTYPE == 3u) {  // block_q4_1: f16 d, f16 m, qs[16]: element j low nibble of qs[j], j + 16 high
      let o = (r * nb + b) * 5u;
      let dm = unpack2x16float(w[o]);
      dw = dm.x;
      summs = summs + dm.y * bitcast<f32>(xq[xb + 1u]);
      for (var l = 0u; l < 4u; l++) {
        let qs = w[o + 1u + l];
        isum[l] = udot4(qs, xq[xb + 2u + l]);
        isum[l + 4u] = udot4(qs >> 4u, xq[xb + 6u + l]);
      }
    } else {  // block_q8_0: f16 d, qs[32] int8; 34 bytes, so odd blocks start 2 bytes into a word
      let o = (r * nb + b) * 34u;
      let wi = o >> 2u;
      let odd = (o & 2u) != 0u;
      var prev = w[wi];
      dw = unpack2x16float(select(prev, prev >> 16u, odd)).x;
      for (var l = 0u; l < 8u; l++) {
        let next = w[wi + 1u + l];
        isum[l] = sdot4(select((prev >> 16u) | (next << 16u), next, odd), xq[xb + 2u + l]);
        prev = next;
      }
    }
    let dd = dw * dx;
    for (var l = 0u; l < 8u; l++) { acc[l] = fma_x(dd, f32(isum[l]), acc[l]); }
  }
  var v = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
  if (QTYPE == 3u) { v = v + summs; }
  if (p.has_bias != 0u) { v = v + bias[p.bias_off + r]; }
  let yi = t * p.y_stride + p.y_off + r;
  if (p.acc_y != 0u) { v = v + y[yi]; }
  y[yi] = v;
}
