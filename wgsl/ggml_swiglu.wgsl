// numerics="ggml": ggml_vec_swiglu_f32 (AVX-512): out = (g / (1 + v_expf(-g))) * u, where
// g, u are halves of a gate|up row (ggml_numerics.swiglu). Where ggml's exp overflows to inf,
// g / inf is a zero and so is the output.
// gu rows at t * in_stride (gate at 0, up at n); out rows at t * n.
// Grid: (min(G, 65535), ceil(G / 65535)) with G = ceil(n_tokens * n / 64).

//!include ggml_lib

struct Params { n_tokens: u32, n: u32, in_stride: u32, one: f32, zero: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> gu: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let i = (wg.x + wg.y * nwg.x) * 64u + lid;
  if (i >= p.n_tokens * p.n) { return; }
  let t = i / p.n;
  let j = i % p.n;
  let g = gu[t * p.in_stride + j];
  let u = gu[t * p.in_stride + p.n + j];
  let e = v_expf(-g);
  var y = 0.0;
  if (e.y == 0.0) {
    var num = g;
    var den = p.one + e.x;
    if (den > 1e30) {  // lavapipe divides through a reciprocal that flushes to 0 past 2^126, and
      num = hide(num * 0.00000095367431640625);  // div_x needs |den| < 2^115: scale both by
      den = hide(den * 0.00000095367431640625);  // 2^-20, exactly (the quotient is unchanged)
    }
    y = div_x(num, den) * u;
  }
  out[i] = y;
}
