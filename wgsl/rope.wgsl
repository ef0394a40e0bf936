// Rotary position embedding, in place, GGML semantics.
// x holds n_tokens rows of row_stride f32; heads [n_heads, head_dim] start at x_off in each
// row (so Q and K heads of a fused QKV row are rotated by one dispatch). Token t has
// position pos0 + t. For pair i < n_rot / 2:
//   theta = (pos0 + t) * freq_scale * base^(-2i / n_rot)
//   normal (llama, neox == 0): rotates elements (2i, 2i + 1)
//   neox   (neox == 1):        rotates elements (i, i + n_rot / 2)
// Elements at or past n_rot are left alone. One thread per pair;
// grid: (min(G, 65535), ceil(G / 65535)) with G = ceil(n_tokens * n_heads * n_rot / 2 / WG).

override WG: u32 = 256u;

struct Params {
  n_tokens: u32, n_heads: u32, head_dim: u32, n_rot: u32,
  row_stride: u32, x_off: u32, pos0: u32, neox: u32,
  base: f32, freq_scale: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;

const TWO_PI: f32 = 6.283185307179586;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let half = p.n_rot / 2u;
  let g = (wg.x + wg.y * nwg.x) * WG + lid;
  if (g >= p.n_tokens * p.n_heads * half) { return; }
  let i = g % half;
  let h = (g / half) % p.n_heads;
  let t = g / (half * p.n_heads);
  let pos = f32(p.pos0 + t);
  var theta = pos * p.freq_scale * pow(p.base, -2.0 * f32(i) / f32(p.n_rot));
  // GPU sin/cos are only accurate near [-pi, pi]: reduce the angle first.
  theta = theta - TWO_PI * floor(theta / TWO_PI);
  let c = cos(theta);
  let s = sin(theta);
  let head = t * p.row_stride + p.x_off + h * p.head_dim;
  var a = head + 2u * i;
  var b = a + 1u;
  if (p.neox != 0u) {
    a = head + i;
    b = a + half;
  }
  let x0 = x[a];
  let x1 = x[b];
  x[a] = x0 * c - x1 * s;
  x[b] = x0 * s + x1 * c;
}
