// y = W · x with W in raw GGUF Q8_0 blocks (no f32 copy of the weights).
// Q8_0 block (34 B, so odd blocks start 2 bytes into a u32 word): f16 d, 32 int8; x = d * q.
// W: [rows, k] row-major, k a multiple of 32. x: k f32 from x_off (x_off % 4 == 0).
// y[y_off + r] = (acc != 0 ? y[y_off + r] : 0) + sum_i W[r, i] x[i]
// Also the tied-embedding logits: W = token_embd [vocab, dim].
// Grid: (min(G, 65535), ceil(G / 65535)) with G = ceil(rows / (WG / TPR)).

override WG: u32 = 256u;
override TPR: u32 = 16u;

struct Params { rows: u32, k: u32, x_off: u32, y_off: u32, acc: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

var<workgroup> partial: array<f32, WG>;

fn sbytes(qw: u32) -> vec4<f32> {  // the four int8 of a word, byte 0 first
  let v = vec4<i32>(bitcast<i32>(qw << 24u), bitcast<i32>(qw << 16u), bitcast<i32>(qw << 8u), bitcast<i32>(qw));
  return vec4<f32>(v >> vec4<u32>(24u));
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let r = (wg.x + wg.y * nwg.x) * (WG / TPR) + lid / TPR;
  let lane = lid % TPR;
  let nb = p.k / 32u;
  var sum = 0.0;
  if (r < p.rows) {
    for (var b = lane; b < nb; b += TPR) {
      let o = (r * nb + b) * 34u;  // byte offset of the block: 4-aligned or 2 past
      let wi = o >> 2u;
      let odd = (o & 2u) != 0u;
      var prev = w[wi];
      let d = unpack2x16float(select(prev, prev >> 16u, odd)).x;
      let xb = p.x_off / 4u + b * 8u;
      var s = 0.0;
      for (var j = 0u; j < 8u; j++) {
        let next = w[wi + 1u + j];
        s += dot(sbytes(select((prev >> 16u) | (next << 16u), next, odd)), x[xb + j]);
        prev = next;
      }
      sum += d * s;
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
