// RMSNorm with weight for CPU adapters (lavapipe, SwiftShader), one row per workgroup of WG
// invocations, no shared memory or barriers (emulated, hence slow, on CPUs): every invocation
// sums the squares of the whole row itself, then writes every WG-th element.
//   out[out_off + r * n + i] = x[x_off + r * n + i] / sqrt(mean_i(x[x_off + r * n + i]^2) + eps) * w[i]
// Same result as rmsnorm.wgsl but for offsets (ops.py uses it before a matvec, where the GPU
// path fuses the norm into the matvec). x and out may not alias. Grid: (n_rows).

override WG: u32 = 4u;

struct Params { n: u32, eps: f32, x_off: u32, out_off: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let xb = p.x_off + wg.x * p.n;
  let ob = p.out_off + wg.x * p.n;
  var s0 = 0.0;
  var s1 = 0.0;
  var s2 = 0.0;
  var s3 = 0.0;
  var i = 0u;
  for (; i + 4u <= p.n; i += 4u) {
    let a = x[xb + i];
    let b = x[xb + i + 1u];
    let c = x[xb + i + 2u];
    let d = x[xb + i + 3u];
    s0 += a * a;
    s1 += b * b;
    s2 += c * c;
    s3 += d * d;
  }
  for (; i < p.n; i++) {
    let a = x[xb + i];
    s0 += a * a;
  }
  let scale = inverseSqrt(((s0 + s1) + (s2 + s3)) / f32(p.n) + p.eps);
  for (var j = lid; j < p.n; j += WG) {
    out[ob + j] = x[xb + j] * scale * w[j];
  }
}
