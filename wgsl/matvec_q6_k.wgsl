// y = W · x with W in raw GGUF Q6_K blocks (no f32 copy of the weights).
// Q6_K super-block (210 B, so odd blocks start 2 bytes into a u32 word): ql[128] low nibbles,
// qh[64] high 2-bit pairs, int8 scales[16], f16 d (last). Element e = 128 h + 32 g + l
// (h < 2, g < 4, l < 32): q = (ql[64 h + 32 (g % 2) + l] >> 4 (g / 2) & 15)
// | ((qh[32 h + l] >> 2 g) & 3) << 4, x = d * scales[8 h + 2 g + l / 16] * (q - 32).
// W: [rows, k] row-major, k a multiple of 256. Each thread takes whole 32-element sub-blocks (h, g).
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

fn u32_at(o: u32) -> u32 {  // the little-endian u32 at byte offset o (o even)
  let i = o >> 2u;
  let lo = w[i];
  return select(lo, (lo >> 16u) | (w[i + 1u] << 16u), (o & 2u) != 0u);
}

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
      let h = sb / 4u;
      let g = sb % 4u;
      let o = (r * (nb / 8u) + b / 8u) * 210u;  // byte offset of the super-block
      let d = unpack2x16float(u32_at(o + 208u)).x;
      let scw = u32_at(o + 192u + 8u * h + 2u * g);  // scales[8h + 2g], [8h + 2g + 1] in the low bytes
      let sc0 = f32(bitcast<i32>(scw << 24u) >> 24u);
      let sc1 = f32(bitcast<i32>(scw << 16u) >> 24u);
      let lsh = 4u * (g / 2u);
      let hsh = 2u * g;
      let ql0 = o + 64u * h + 32u * (g % 2u);
      let qh0 = o + 128u + 32u * h;
      var s_lo = 0.0;
      var s_hi = 0.0;
      for (var i = 0u; i < 8u; i++) {
        let lw = u32_at(ql0 + 4u * i) >> lsh;
        let hw = u32_at(qh0 + 4u * i) >> hsh;
        let lo = vec4<u32>(lw, lw >> 8u, lw >> 16u, lw >> 24u) & vec4<u32>(0xfu);
        let hi = vec4<u32>(hw, hw >> 8u, hw >> 16u, hw >> 24u) & vec4<u32>(3u);
        let q = vec4<f32>(lo | (hi << vec4<u32>(4u))) - 32.0;
        let part = dot(q, xin(b, i));
        if (i < 4u) { s_lo += part; } else { s_hi += part; }
      }
      sum += d * (sc0 * s_lo + sc1 * s_hi);
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
