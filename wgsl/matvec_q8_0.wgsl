// y = W · x with W in raw GGUF Q8_0 blocks (no f32 copy of the weights).
// Q8_0 block (34 B, so odd blocks start 2 bytes into a u32 word): f16 d, 32 int8; x = d * q.
// W: [rows, k] row-major, k a multiple of 32. x: k f32 from x_off (x_off % 4 == 0).
// y[y_off + r] = (acc != 0 ? y[y_off + r] : 0) + sum_i W[r, i] xin[i], where by XMODE
//   0: xin = x[x_off ..]
//   1: xin = rmsnorm(x[x_off .. x_off + k]) * nw   (fused RMSNorm: y = inv_rms * W (x * nw);
//      every workgroup recomputes the k-long sum of squares, cheaper than a dispatch)
//   2: xin = silu(x[x_off ..]) * x[up_off ..]      (fused SwiGLU on a gate|up vector)
// (acc = 1 fuses the residual add.) nw is bound but unused unless XMODE == 1.
// Also the tied-embedding logits: W = token_embd [vocab, dim].
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
      let o = (r * nb + b) * 34u;  // byte offset of the block: 4-aligned or 2 past
      let wi = o >> 2u;
      let odd = (o & 2u) != 0u;
      var prev = w[wi];
      let d = unpack2x16float(select(prev, prev >> 16u, odd)).x;
            var s = 0.0;
      for (var j = 0u; j < 8u; j++) {
        let next = w[wi + 1u + j];
        s += dot(sbytes(select((prev >> 16u) | (next << 16u), next, odd)), xin(b, j));
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
    y[i] = select(0.0, y[i], p.acc != 0u) + inv * partial[lid];
  }
}
