// numerics="ggml" load-time probe of the adapter's float32 arithmetic: for each (a, b, c),
// out = [fma(a, b, c), a / b, sqrt(|a|), fma_x(a, b, c), div_x(a, b), sqrt_x(|a|)];
// gpu/ggml_ops.py compares them with the correctly rounded results (is fma fused? are / and
// sqrt correctly rounded? are the emulations, compiled as the probe found, exact?).
// Grid: (ceil(n / 64), 1, 1).

//!include ggml_lib

struct Params { n: u32, zero: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> abc: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  let i = gid.x;
  if (i >= p.n) { return; }
  let a = abc[3u * i];
  let b = abc[3u * i + 1u];
  let c = abc[3u * i + 2u];
  out[6u * i] = fma(a, b, c);
  out[6u * i + 1u] = a / b;
  out[6u * i + 2u] = sqrt(abs(a));
  out[6u * i + 3u] = fma_x(a, b, c);
  out[6u * i + 4u] = div_x(a, b);
  out[6u * i + 5u] = sqrt_x(abs(a));
}
