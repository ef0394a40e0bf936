// numerics="ggml": ggml_rms_norm + ggml_mul, bit for bit (ggml_numerics.rmsnorm):
// squares in float32 summed in order in double, mean = (float)(sum / n),
// scale = 1.0f / sqrtf(mean + eps), y = (x * scale) * w. One invocation per row.
// x rows at x_off + r * x_stride; y rows at r * n.
// Grid: (ceil(n_rows / 64), 1, 1).

//!include ggml_lib

struct Params { n_rows: u32, n: u32, x_off: u32, x_stride: u32, eps: f32, zero: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  let r = gid.x;
  if (r >= p.n_rows) { return; }
  let base = p.x_off + r * p.x_stride;
  var acc = vec2<f32>(0.0, 0.0);
  for (var i = 0u; i < p.n; i++) {
    let v = x[base + i];
    acc = dd_add(acc, v * v);
  }
  let mean = dd_over_f32(acc, f32(p.n));
  let scale = div_x(1.0, sqrt_x(mean + p.eps));
  for (var i = 0u; i < p.n; i++) {
    y[r * p.n + i] = (x[base + i] * scale) * w[i];
  }
}
