// y = W · x with W in raw GGUF Q4_K blocks (no f32 copy of the weights).
// Q4_K super-block (144 B, 4-byte aligned): f16 d, f16 dmin, 12 B of 6-bit scales and mins for
// eight 32-element sub-blocks, 128 B of nibbles. Sub-block s (0..7) uses nibble bytes
// 32 (s / 2) .. + 31, low nibbles for even s, high for odd; x = d * sc_s * q - dmin * m_s
// (ggml get_scale_min_k4: s < 4: sc = scales[s] & 63, m = scales[s + 4] & 63; else
// sc = (scales[s + 4] & 15) | (scales[s - 4] >> 6) << 4, m = (scales[s + 4] >> 4) | (scales[s] >> 6) << 4).
// W: [rows, k] row-major, k a multiple of 256. Each thread takes whole 32-element sub-blocks.
// x: k f32 from x_off (x_off % 4 == 0).
// y[y_off + r] = (acc != 0 ? y[y_off + r] : 0) + sum_i W[r, i] xin[i], where by XMODE
//   0: xin = x[x_off ..]
//   1: xin = rmsnorm(x[x_off .. x_off + k]) * nw   (fused RMSNorm: y = inv_rms * W (x * nw);
//      every workgroup recomputes the k-long sum of squares, cheaper than a dispatch)
//   2: xin = silu(x[x_off ..]) * x[up_off ..]      (fused SwiGLU on a gate|up vector)
// (acc = 1 fuses the residual add.) nw is bound but unused unless XMODE == 1.
// TPR threads share a row (each takes whole blocks), WG / TPR rows per workgroup.
// Grid: (min(G, 65535), ceil(G / 65535)) with G = ceil(rows / (WG / TPR)).

override WG: u32 = 256u;
override TPR: u32 = 16u;
override XMODE: u32 = 0u;

struct Params { rows: u32, k: u32, x_off: u32, y_off: u32, acc: u32, up_off: u32, eps: f32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read> nw: array<vec4<f32>>;

var<workgroup> partial: array<f32, WG>;

fn xin(b: u32, j: u32) -> vec4<f32> {  // elements 4j..4j+3 of block b of the input
  let i = b * 8u + j;
  let v = x[p.x_off / 4u + i];
  if (XMODE == 1u) { return v * nw[i]; }
  if (XMODE == 2u) { return v / (1.0 + exp(-v)) * x[p.up_off / 4u + i]; }
  return v;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let r = (wg.x + wg.y * nwg.x) * (WG / TPR) + lid / TPR;
  let lane = lid % TPR;
  let nb = p.k / 32u;  // 32-element sub-blocks per row
  var inv = 1.0;
  if (XMODE == 1u) {
    var ss = 0.0;
    for (var i = lid; i < p.k / 4u; i += WG) {
      let v = x[p.x_off / 4u + i];
      ss += dot(v, v);
    }
    partial[lid] = ss;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
      if (lid < s) { partial[lid] += partial[lid + s]; }
      workgroupBarrier();
    }
    inv = inverseSqrt(partial[0] / f32(p.k) + p.eps);
    workgroupBarrier();
  }
  var sum = 0.0;
  if (r < p.rows) {
    for (var b = lane; b < nb; b += TPR) {  // b: 32-element sub-block index within the row
      let sb = b % 8u;
      let wb = (r * (nb / 8u) + b / 8u) * 36u;  // 144 B = 36 words per super-block
      let dm = unpack2x16float(w[wb]);
      // the 12 scale bytes are words wb+1 .. wb+3
      let s0 = w[wb + 1u];
      let s1 = w[wb + 2u];
      let s2 = w[wb + 3u];
      let j = sb % 4u;
      var sc: u32;
      var mn: u32;
      if (sb < 4u) {
        sc = (s0 >> (8u * j)) & 63u;
        mn = (s1 >> (8u * j)) & 63u;
      } else {
        let hi_sc = (s0 >> (8u * j + 6u)) & 3u;  // scales[s - 4] >> 6
        let hi_m = (s1 >> (8u * j + 6u)) & 3u;   // scales[s] >> 6
        let lo = (s2 >> (8u * j)) & 0xffu;       // scales[s + 4]
        sc = (lo & 15u) | (hi_sc << 4u);
        mn = (lo >> 4u) | (hi_m << 4u);
      }
      let shift = 4u * (sb % 2u);
      let qb = wb + 4u + 8u * (sb / 2u);
      var sq = 0.0;
      var sx = 0.0;
      for (var i = 0u; i < 8u; i++) {
        let qw = w[qb + i] >> shift;
        let q = vec4<f32>(vec4<u32>(qw, qw >> 8u, qw >> 16u, qw >> 24u) & vec4<u32>(0xfu));
        let xv = xin(b, i);
        sq += dot(q, xv);
        sx += dot(xv, vec4<f32>(1.0));
      }
      sum += dm.x * f32(sc) * sq - dm.y * f32(mn) * sx;
    }
  }
  partial[lid] = sum;
  workgroupBarrier();
  for (var s = TPR / 2u; s > 0u; s >>= 1u) {
    if (lane < s) { partial[lid] += partial[lid + s]; }
    workgroupBarrier();
  }
  if (lane == 0u && r < p.rows) {
    let i = p.y_off + r;
    y[i] = select(0.0, y[i], p.acc != 0u) + inv * partial[lid];
  }
}
