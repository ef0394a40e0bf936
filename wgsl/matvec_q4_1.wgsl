// y = W · x with W in raw GGUF Q4_1 blocks (no f32 copy of the weights).
// Q4_1 block (20 B, so every block is 4-byte aligned): f16 d, f16 m, 16 B of nibbles;
// element i < 16 is the low nibble of byte i, element 16 + i its high nibble; x = d * q + m.
// W: [rows, k] row-major, k a multiple of 32. x: k f32 from x_off (x_off % 4 == 0).
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
  let nb = p.k / 32u;
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
    for (var b = lane; b < nb; b += TPR) {
      let wb = (r * nb + b) * 5u;
      let dm = unpack2x16float(w[wb]);
            var sq = 0.0;
      var sx = 0.0;
      for (var j = 0u; j < 4u; j++) {
        let qw = w[wb + 1u + j];
        let lo = vec4<f32>(vec4<u32>(qw, qw >> 8u, qw >> 16u, qw >> 24u) & vec4<u32>(0xfu));
        let hi = vec4<f32>(vec4<u32>(qw >> 4u, qw >> 12u, qw >> 20u, qw >> 28u) & vec4<u32>(0xfu));
        let xl = xin(b, j);
        let xh = xin(b, 4u + j);
        sq += dot(lo, xl) + dot(hi, xh);
        sx += dot(xl + xh, vec4<f32>(1.0));
      }
      sum += dm.x * sq + dm.y * sx;
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
