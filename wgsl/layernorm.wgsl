// LayerNorm over rows, as torch.nn.LayerNorm (biased variance, eps inside the square root):
//   out[r, i] = (x[r, i] - mean_r) / sqrt(var_r + eps) * w[i] + b[i]
//   mean_r = sum_i x[r, i] / n,  var_r = sum_i (x[r, i] - mean_r)^2 / n   (two passes over the
// row: the centred sum of squares does not cancel the way E[x^2] - mean^2 does).
// x and out are [n_rows, n] contiguous f32 and may not alias. One row per workgroup of WG
// threads (a power of two), each summing every WG-th element, then a tree reduction in
// workgroup memory. BERT's residual adds are fused into the matmul before it
// (matmul_f32_bias.wgsl, EPILOGUE 2), so this kernel reads one input.
// Grid: (min(n_rows, 65535), ceil(n_rows / 65535)); row = wg.x + wg.y * 65535.

override WG: u32 = 64u;

struct Params { n_rows: u32, n: u32, eps: f32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> b: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

var<workgroup> red: array<f32, WG>;

fn reduce_sum(v: f32, lid: u32) -> f32 {
  red[lid] = v;
  workgroupBarrier();
  for (var s = WG / 2u; s > 0u; s >>= 1u) {
    if (lid < s) { red[lid] += red[lid + s]; }
    workgroupBarrier();
  }
  let r = red[0];
  workgroupBarrier();  // everyone has read red[0] before it is written again
  return r;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let row = wg.x + wg.y * nwg.x;
  if (row >= p.n_rows) { return; }  // uniform per workgroup: no barrier is skipped by part of it
  let base = row * p.n;
  var s = 0.0;
  for (var i = lid; i < p.n; i += WG) { s += x[base + i]; }
  let mean = reduce_sum(s, lid) / f32(p.n);
  var ss = 0.0;
  for (var i = lid; i < p.n; i += WG) {
    let d = x[base + i] - mean;
    ss += d * d;
  }
  let inv_std = inverseSqrt(reduce_sum(ss, lid) / f32(p.n) + p.eps);
  for (var i = lid; i < p.n; i += WG) {
    out[base + i] = (x[base + i] - mean) * inv_std * w[i] + b[i];
  }
}
