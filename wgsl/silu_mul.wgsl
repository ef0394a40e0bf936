// SwiGLU: out[t, i] = silu(gate[t, i]) * up[t, i], silu(g) = g / (1 + exp(-g)).
// gu holds n_tokens rows of in_stride f32 with gate at gate_off and up at up_off in each row
// (a fused gate|up matvec output has in_stride = 2n, gate_off = 0, up_off = n).
// out is [n_tokens, n] contiguous. Grid: (min(G, 65535), ceil(G / 65535)), G = ceil(n_tokens * n / WG).

override WG: u32 = 256u;

struct Params { n_tokens: u32, n: u32, in_stride: u32, gate_off: u32, up_off: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> gu: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let g = (wg.x + wg.y * nwg.x) * WG + lid;
  if (g >= p.n_tokens * p.n) { return; }
  let t = g / p.n;
  let i = g % p.n;
  let a = gu[t * p.in_stride + p.gate_off + i];
  let b = gu[t * p.in_stride + p.up_off + i];
  // exp(-a) overflows to inf for a < -88: a / inf = -0, the correct limit.
  out[g] = a / (1.0 + exp(-a)) * b;
}
