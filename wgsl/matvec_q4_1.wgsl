// y = W · x with W in raw GGUF Q4_1 blocks (no f32 copy of the weights).
// Q4_1 block (20 B, so every block is 4-byte aligned): f16 d, f16 m, 16 B of nibbles;
// element i < 16 is the low nibble of byte i, element 16 + i its high nibble; x = d * q + m.
// W: [rows, k] row-major, k a multiple of 32. x: k f32 from x_off (x_off % 4 == 0).
// y[y_off + r] = (acc != 0 ? y[y_off + r] : 0) + sum_i W[r, i] x[i]   (acc fuses a residual add)
// TPR threads share a row (each takes whole blocks), WG / TPR rows per workgroup.
// Grid: (min(G, 65535), ceil(G / 65535)) with G = ceil(rows / (WG / TPR)).

override WG: u32 = 256u;
override TPR: u32 = 16u;

struct Params { rows: u32, k: u32, x_off: u32, y_off: u32, acc: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

var<workgroup> partial: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let r = (wg.x + wg.y * nwg.x) * (WG / TPR) + lid / TPR;
  let lane = lid % TPR;
  let nb = p.k / 32u;
  var sum = 0.0;
  if (r < p.rows) {
    for (var b = lane; b < nb; b += TPR) {
      let wb = (r * nb + b) * 5u;
      let dm = unpack2x16float(w[wb]);
      let xb = p.x_off / 4u + b * 8u;
      var sq = 0.0;
      var sx = 0.0;
      for (var j = 0u; j < 4u; j++) {
        let qw = w[wb + 1u + j];
        let lo = vec4<f32>(vec4<u32>(qw, qw >> 8u, qw >> 16u, qw >> 24u) & vec4<u32>(0xfu));
        let hi = vec4<f32>(vec4<u32>(qw >> 4u, qw >> 12u, qw >> 20u, qw >> 28u) & vec4<u32>(0xfu));
        let xl = x[xb + j];
        let xh = x[xb + 4u + j];
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
    y[i] = select(0.0, y[i], p.acc != 0u) + partial[lid];
  }
}
